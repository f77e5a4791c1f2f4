"""The store a command works on, opened once: MLflow (runs and the persona registry) and the
episodic memory.

Where memory lives is the command's one decision (`memory=`):
- "persistent": the store's own Qdrant (`<store>/qdrant`, or `--qdrant-url`), which `ingest`
  fills and `nightly`, `demo` and `answer` read;
- "run": a throwaway in-process Qdrant that lives as long as the command (`eval`, `sweep`), so a
  measurement never reads what any other command stored; `scoped(name)` gives each part of a
  run (a sweep point, a dataset) memory of its own;
- None: no memory at all (`personas`, `compare`).

`tracking=False` (ingest, which writes memory only) leaves MLflow alone: not even imported,
which keeps a cron ingest fast.
"""

from __future__ import annotations

import contextlib
import hashlib
from typing import TYPE_CHECKING, Iterator, Literal

from qdrant_client import QdrantClient

from .pipelines.memory import EpisodicMemory
from .settings import Settings

if TYPE_CHECKING:
    from .registry import PersonaRegistry

MemoryScope = Literal["persistent", "run"] | None


class Store:
    def __init__(self, settings: Settings, client: QdrantClient | None = None):
        self.settings, self.client = settings, client
        self.memory = EpisodicMemory(client) if client is not None else None

    @classmethod
    @contextlib.contextmanager
    def open(cls, settings: Settings, *, memory: MemoryScope, tracking: bool = True) -> Iterator["Store"]:
        if tracking:
            from . import tracking as mlflow_tracking

            mlflow_tracking.setup(settings)
        else:
            settings.store.mkdir(parents=True, exist_ok=True)
        client = None
        if memory == "persistent":
            client = QdrantClient(url=settings.qdrant_url) if settings.qdrant_url else QdrantClient(
                path=str(settings.qdrant_path))
        elif memory == "run":
            client = QdrantClient(location=":memory:")
        elif memory is not None:
            raise ValueError(f"memory must be 'persistent', 'run' or None, not {memory!r}")
        try:
            yield cls(settings, client)
        finally:
            if client is not None:
                client.close()

    def scoped(self, name: str) -> EpisodicMemory:
        """Memory of its own for one part of a run, beside every other part's in this store."""
        if self.client is None:
            raise RuntimeError("this store was opened without memory")
        return EpisodicMemory(self.client, collection=f"scope-{hashlib.sha256(name.encode()).hexdigest()[:16]}")

    def registry(self, task) -> "PersonaRegistry":
        from .registry import PersonaRegistry

        return PersonaRegistry(task, self.settings.tracking_uri)
