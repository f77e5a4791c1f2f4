"""The store a command works on, opened once: MLflow (runs and the persona registry) and the
episodic memory.

Where memory lives is the command's one decision (`memory=`):
- "persistent": the store's own Qdrant Edge shard (`<store>/qdrant-edge`), or `--qdrant-url`,
  which `ingest` fills and `nightly`, `demo` and `answer` read;
- "run": throwaway in-process Edge shards that live as long as the command (`eval`, `sweep`),
  so a measurement never reads what any other command stored; `scoped(name)` gives each part
  of a run (a sweep point, a dataset) memory of its own;
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
import errno
import hashlib
import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Literal

from filelock import FileLock, Timeout
from qdrant_client import QdrantClient

from persona_agent.adapters.points import ClientPoints, EdgePoints, scratch_dir
from persona_agent.pipelines.memory import EpisodicMemory
from persona_agent.pipelines.points import PointStore, StoreLocked
from persona_agent.settings import Settings

if TYPE_CHECKING:
    from persona_agent.adapters.registry import PersonaRegistry

MemoryScope = Literal["persistent", "run"] | None
log = logging.getLogger(__name__)


class StoreBusy(RuntimeError):
    """Another process held the store's embedded memory for longer than we could wait."""


class PreReleaseStore(ValueError):
    """A store laid out by a pre-release version, which this one does not read."""


class StoreFull(OSError):
    """The store's disk has less free space than the margin a write needs."""


def disk_full(err: BaseException) -> bool:
    """A write refused for space: the OS's ENOSPC or EDQUOT, or SQLite's words for it."""
    return isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT) or "database or disk is full" in str(err)


def require_free_space(path: Path, min_free_mb: int) -> None:
    """Refuse a write up front rather than die in it: Edge writes through memory-mapped pages,
    and a page that cannot be backed on a full disk kills the process (SIGBUS, no message)
    half-way through an ingest; SQLite on a full disk fails mid-transaction."""
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < min_free_mb * 2**20:
        raise StoreFull(f"{path}: only {free / 2**20:.0f} MB free on its disk, under the {min_free_mb} MB margin a write "
                        "needs (--min-free-mb); nothing was written: free some space and run it again")


@contextlib.contextmanager
def _embedded_memory(settings: Settings) -> Iterator[EpisodicMemory]:
    deadline = time.monotonic() + settings.store_wait
    lock = FileLock(str(settings.memory_lock))
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
        memory = _open_when_free(settings, deadline)
        try:
            yield memory
        finally:
            memory.close()
    finally:
        lock.release()


def refuse_pre_release(settings: Settings) -> None:
    """Before 0.1.0 memory lived in qdrant-client's files (`<store>/qdrant`) and the nightly state
    in one JSON file per user (`<store>/nightly/<task>/`). Copying them in cost more code than any
    store outside development needs: such a store is refused whole, before anything is read or
    written, rather than read as an empty one."""
    found = [p for p in (settings.store / "qdrant", *(settings.store / "nightly").glob("*/*.json")) if p.exists()]
    if found:
        raise PreReleaseStore(f"{settings.store} was written by a pre-release version of persona-agent ({found[0]}); "
                              "this version does not read it: ingest the data into a new --store, then delete this "
                              "one (it holds users' data)")


@contextlib.contextmanager
def exclusive(settings: Settings) -> Iterator[None]:
    """The store's nightly and memory locks, waited for up to `--wait` seconds each: no nightly
    commits and no memory writer runs while the store is read or copied."""
    settings.store.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        for path, who in ((settings.nightly_lock, "a nightly run"), (settings.memory_lock, "another command")):
            lock = FileLock(str(path))
            try:
                lock.acquire(timeout=settings.store_wait)
            except Timeout:
                raise StoreBusy(f"{who} kept {path} for over {settings.store_wait:g} s; try again later or raise "
                                "--wait") from None
            stack.callback(lock.release)
        yield


def _open_when_free(settings: Settings, deadline: float) -> EpisodicMemory:
    """Qdrant's own lock can outlive ours for a moment (a process that is exiting), or be held by
    a process that never takes ours (a notebook): retry until the deadline."""
    while True:
        try:
            return EpisodicMemory(EdgePoints(settings.qdrant_path))
        except StoreLocked:
            if time.monotonic() >= deadline:
                raise StoreBusy(f"the memory of {settings.store} is open in a process outside persona-agent; "
                                "close it there first") from None
            time.sleep(0.2)


class Store:
    """`memory`: the command's memory (None without one); `scoped(name)`: memory of its own for
    one part of a run, beside the others. Every memory opened here is closed with the store."""

    def __init__(self, settings: Settings):
        self.settings, self.memory = settings, None
        self._scope: Callable[[str], PointStore] | None = None  # collection name -> its points
        self._scoped: dict[str, EpisodicMemory] = {}

    @classmethod
    @contextlib.contextmanager
    def open(cls, settings: Settings, *, memory: MemoryScope, tracking: bool = True,
             writes: bool = False) -> Iterator["Store"]:
        """writes: the command writes the store (ingest, nightly, demo): checked for free space first."""
        refuse_pre_release(settings)
        if writes:
            require_free_space(settings.store, settings.min_free_mb)
        if tracking:
            from persona_agent.adapters import tracking as mlflow_tracking

            mlflow_tracking.setup(settings)
        else:
            settings.store.mkdir(parents=True, exist_ok=True)
        if memory not in ("persistent", "run", None):
            raise ValueError(f"memory must be 'persistent', 'run' or None, not {memory!r}")
        with contextlib.ExitStack() as stack:
            store = cls(settings)
            if memory == "persistent" and not settings.qdrant_url:
                store.memory = stack.enter_context(_embedded_memory(settings))
            elif memory == "persistent":
                client = QdrantClient(url=settings.qdrant_url)
                stack.callback(client.close)
                store._scope = lambda collection: ClientPoints(client, collection)
                store.memory = EpisodicMemory(store._scope("episodic"))
            elif memory == "run":  # throwaway Edge shards, one per scope, in one directory
                root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="persona-agent-run-",
                                                                            dir=scratch_dir())))
                store._scope = lambda collection: EdgePoints(root / collection)
                store.memory = EpisodicMemory(store._scope("episodic"))
                stack.callback(store.memory.close)
            stack.callback(lambda: [m.close() for m in store._scoped.values()])
            yield store

    def scoped(self, name: str) -> EpisodicMemory:
        """Memory of its own for one part of a run, beside every other part's in this store."""
        if self._scope is None:
            raise RuntimeError("this store was opened without run memory")
        collection = f"scope-{hashlib.sha256(name.encode()).hexdigest()[:16]}"
        if collection not in self._scoped:
            self._scoped[collection] = EpisodicMemory(self._scope(collection))
        return self._scoped[collection]

    def registry(self, task) -> "PersonaRegistry":
        from persona_agent.adapters.registry import PersonaRegistry

        return PersonaRegistry(task, self.settings.tracking_uri)
