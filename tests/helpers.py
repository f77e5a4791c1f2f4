"""Small helpers several test modules share."""

import json
from pathlib import Path

from persona_agent.eval.tasks import LAMP_2M, Task
from persona_agent.pipelines.ingest import IngestReport, ingest
from persona_agent.pipelines.memory import EpisodicMemory
from persona_agent.settings import Settings


def ingest_into(settings: Settings, path: Path, task: Task = LAMP_2M) -> IngestReport:
    """What `persona-agent ingest` does: the file into the store's embedded memory."""
    settings.store.mkdir(parents=True, exist_ok=True)
    memory = EpisodicMemory.open(path=str(settings.qdrant_path))
    try:
        return ingest(memory, path, task)
    finally:
        memory.close()


def write_events(path: Path, rows: list[dict]) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path
