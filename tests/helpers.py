"""Small helpers several test modules share."""

import json
import subprocess
import sys
from pathlib import Path

from qdrant_client import QdrantClient

from persona_agent.adapters.points import ClientPoints, open_memory
from persona_agent.adapters.state import StateStore
from persona_agent.data.tasks import LAMP_2M, Task
from persona_agent.pipelines.ingest import IngestReport, ingest
from persona_agent.pipelines.memory import EpisodicMemory
from persona_agent.runtime.store import Store
from persona_agent.settings import Settings


def ingest_into(settings: Settings, path: Path, task: Task = LAMP_2M) -> IngestReport:
    """What `persona-agent ingest` does: the file into the store's embedded memory, through
    `Store.open` (its lock and its free-space check), as the command opens it."""
    with Store.open(settings, memory="persistent", tracking=False, writes=True) as store:
        return ingest(store.memory, path, task, mark_changed=StateStore.of(settings, task.key).mark_changed)


def aligned_store(root: Path) -> Path:
    """A store of 3 users ingested and aligned by one nightly (scripted LM), for tests that copy
    it and then damage, erase or lock it."""
    import pytest

    from persona_agent.adapters.llm import build_lm
    from persona_agent.data.synthetic import write_dataset
    from persona_agent.nightly.driver import run_nightly
    from persona_agent.settings import LMConfig

    settings = Settings(store=root / "store", lm=LMConfig("scripted", cache=False), batch_size=2, iterations=1)
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        ingest_into(settings, write_dataset(root / "data", LAMP_2M, n_users=3, n_history=4, n_queries=1, seed=3))
        run_nightly(settings, LAMP_2M, lm=build_lm(settings.lm))
    return settings.store


def throwaway_memory(kind: str, embedder=None) -> EpisodicMemory:
    """A throwaway memory on either point store: "edge" (the embedded default) or "client" (the
    server path, ClientPoints, on qdrant-client's in-process engine, which speaks a server's API)."""
    if kind == "edge":
        return open_memory(":memory:", embedder=embedder)  # adapters.points
    size = len(embedder(["probe"])[0]) if embedder else None
    return EpisodicMemory(ClientPoints(QdrantClient(location=":memory:"), dense_size=size, owns_client=True), embedder)


def write_events(path: Path, rows: list[dict]) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


def typed(notes: str, task: Task = LAMP_2M) -> str:
    """The profile a typed profile writer produces from `notes`: the labels they name (comedy when
    none) as the typed part, then the notes."""
    from persona_agent.pipelines.persona import compose_profile

    return compose_profile(task, named_labels(notes, task), notes)[0]


def named_labels(text: str, task: Task = LAMP_2M) -> list[str]:
    import re

    found = [label for label in task.labels if re.search(rf"(?<![\w-]){re.escape(label)}(?![\w-])", text.lower())]
    return found[:3] or ["comedy"]


def notes_of(profile: str, task: Task = LAMP_2M) -> str:
    """The free notes of a typed profile (all of an untyped one)."""
    return profile.split(". ", 1)[1] if profile.startswith(task.preference_lead) and ". " in profile else profile


_SCAN = """
import sys
from pathlib import Path
root, needle = Path(sys.argv[1]), bytes.fromhex(sys.argv[2])
for p in sorted(root.rglob("*")):
    if p.is_file() and not p.is_symlink() and needle in p.read_bytes():
        print(p)
"""


def files_holding(root: Path, needle: bytes) -> list[Path]:
    """The files under `root` whose bytes hold `needle`, read in a process of their own: a process
    that opens and closes a SQLite file it also holds connections to (MLflow's pool, DSPy's cache)
    drops that database's POSIX locks, and the next process to write it corrupts it."""
    out = subprocess.run([sys.executable, "-c", _SCAN, str(root), needle.hex()], capture_output=True, text=True,
                         check=True).stdout
    return [Path(line) for line in out.splitlines()]
