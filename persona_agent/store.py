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

Embedded Qdrant serves one process at a time. Commands hold the persistent memory briefly
(`answer`: one query; `nightly`: planning only) and take turns on `<store>/memory.lock`: a command
that finds it held waits up to `Settings.store_wait` seconds, saying so, then raises `StoreBusy`.
A Qdrant server (`--qdrant-url`) serves many processes, so no lock is taken for it.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import time
from typing import TYPE_CHECKING, Iterator, Literal

from filelock import FileLock, Timeout
from qdrant_client import QdrantClient

from .pipelines.memory import EpisodicMemory
from .settings import Settings

if TYPE_CHECKING:
    from .registry import PersonaRegistry

MemoryScope = Literal["persistent", "run"] | None
log = logging.getLogger(__name__)


class StoreBusy(RuntimeError):
    """Another process held the store's embedded memory for longer than we could wait."""


@contextlib.contextmanager
def _embedded_memory(settings: Settings) -> Iterator[QdrantClient]:
    deadline = time.monotonic() + settings.store_wait
    lock = FileLock(str(settings.store / "memory.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.warning("another process is using the memory of %s; waiting up to %g s for it",
                    settings.store, settings.store_wait)
        try:
            lock.acquire(timeout=settings.store_wait)
        except Timeout:
            raise StoreBusy(f"another process kept the memory of {settings.store} for over {settings.store_wait:g} s; "
                            "try again later or raise --wait") from None
    try:
        client = _open_when_free(settings, deadline)
        try:
            yield client
        finally:
            client.close()
    finally:
        lock.release()


def _open_when_free(settings: Settings, deadline: float) -> QdrantClient:
    """Qdrant's own lock can outlive ours for a moment (a process that is exiting), or be held by
    a process that never takes ours (a notebook): retry until the deadline."""
    while True:
        try:
            return QdrantClient(path=str(settings.qdrant_path))
        except RuntimeError as err:
            if "already accessed" not in str(err):
                raise
            if time.monotonic() >= deadline:
                raise StoreBusy(f"the memory of {settings.store} is open in a process outside persona-agent; "
                                "close it there first") from None
            time.sleep(0.2)


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
        if memory == "persistent" and not settings.qdrant_url:
            with _embedded_memory(settings) as client:
                yield cls(settings, client)
            return
        client = None
        if memory == "persistent":
            client = QdrantClient(url=settings.qdrant_url)
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
