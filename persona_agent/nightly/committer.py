"""The nightly's commit processes: child processes do every registry and state write.

Against a tracking server (`mlflow server`, on PostgreSQL in a team) several commit at once, each
its own users; on a local SQLite database, which takes one writer at a time, one does."""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import threading
import time
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass

import mlflow

from persona_agent.adapters.registry import PersonaRegistry
from persona_agent.adapters.state import StateStore
from persona_agent.nightly.jobs import UserOutcome, commit
from persona_agent.runtime.store import require_free_space
from persona_agent.settings import sqlite_file

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Commit:
    """One user's commit, sent to a commit process (`Committer.submit`)."""

    outcome: UserOutcome
    future: Future
    pool: ProcessPoolExecutor  # the process pool it went to (a commit process that died is replaced)

    def done(self) -> bool:
        return self.future.done()


class Committer:
    """One child process does every registry and state write, in arrival order: MLflow's
    SQLAlchemy writes are CPU work that would otherwise share this interpreter with the workers.

    A committer that dies (killed, out of memory) is replaced, up to `RESTARTS` times, and the
    commits it had not finished are sent again: a commit is idempotent (`jobs.commit`).
    Past that, the users not yet committed fail, named, and keep their personas."""

    RESTARTS = 3

    def __init__(self, tracking_uri: str, task_key: str, state_db, *, run_id: str, night: int, min_free_mb: int = 0,
                 processes: int = 1):
        self.args = (task_key, str(state_db), run_id, night, min_free_mb)
        self.restarts, self.tracking_uri = self.RESTARTS, tracking_uri
        # a user is committed by one process, once: commits of different users touch different
        # prompts and state rows, so they run in parallel where the tracking store takes writers
        self.processes = 1 if sqlite_file(tracking_uri) is not None else max(1, processes)
        self.pool = self._start()

    def _start(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(max_workers=self.processes, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_init, initargs=(self.tracking_uri, os.getpid()))

    def _replace(self, broken: ProcessPoolExecutor) -> None:
        if self.pool is broken:  # the first of its pending commits to notice starts the next one
            if self.restarts <= 0:
                raise BrokenProcessPool("the commit process died too often; not restarting it")
            self.restarts -= 1
            log.warning("the commit process died; starting a new one (%d restarts left)", self.restarts)
            broken.shutdown(wait=False)
            self.pool = self._start()

    def submit(self, outcome: UserOutcome) -> Commit:
        pool = self.pool
        try:
            return Commit(outcome, pool.submit(_commit_in_child, outcome, *self.args), pool)
        except BrokenProcessPool:
            self._replace(pool)
            return self.submit(outcome)

    def result(self, sent: Commit) -> int | None | BaseException:
        """The production version, or the exception the commit ended with."""
        try:
            return sent.future.result()
        except BrokenProcessPool as err:
            try:
                self._replace(sent.pool)
            except BrokenProcessPool:
                return err
            return self.result(self.submit(sent.outcome))
        except Exception as err:
            return err

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.pool.shutdown(wait=True)


def _init(tracking_uri: str, parent: int) -> None:
    # Ctrl-C reaches the whole process group: the parent decides when committing stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    mlflow.set_tracking_uri(tracking_uri)
    threading.Thread(target=_exit_when_orphaned, args=(parent,), daemon=True).start()


def _exit_when_orphaned(parent: int) -> None:
    """A pool worker outlives a killed parent, waiting for work forever; this one exits instead
    (a commit it was in the middle of is redone, deduplicated, by the next run)."""
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(1)


def _commit_in_child(outcome, task_key: str, state_db: str, run_id: str, night: int, min_free_mb: int):
    from pathlib import Path

    from persona_agent.data.tasks import get_task

    require_free_space(Path(state_db), min_free_mb)  # the user fails, named, and keeps their persona
    task = get_task(task_key)
    return commit(outcome, task, PersonaRegistry(task), states=StateStore(Path(state_db), task_key), run_id=run_id,
                  night=night)
