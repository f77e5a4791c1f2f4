"""Per-user nightly state, and which users changed: one SQLite database in the store (`state.db`).

Two tables:
- `state (task, user_id, body)`: what the last completed nightly aligned the user on (fingerprint,
  item ids, production version, prequential scores) and the change it consumed (`seen`);
- `changed (user_id, mark)`: the latest change to the user's memory, a number that only grows.
  `ingest` marks a user *before* it writes their memory (a crash in between leaves a mark whose
  memory did not change: the nightly finds the fingerprint unchanged, which is cheap; the other
  order could lose a change).

So a night plans exactly the users whose mark is newer than what their state saw: users with new
interactions, and users whose last run failed, was deferred or was interrupted (never committed,
so their mark is still unseen). Planning reads two indexed tables, not every user's memory.

The first night of a task marks every user in memory (`ready`), so it checks everyone by
fingerprint once. Read by `nightly` to
plan, by the commit process to record, by `answer` and `doctor` to notice a history that shrank,
and cleared by `forget`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sqlite3
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable, Iterable, Iterator

from persona_agent.settings import Settings

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS state (task TEXT NOT NULL, user_id TEXT NOT NULL, body TEXT NOT NULL,
                                  PRIMARY KEY (task, user_id));
CREATE TABLE IF NOT EXISTS changed (user_id TEXT PRIMARY KEY, mark INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


@dataclass(frozen=True)
class UserState:
    """A row of `state`: what the last completed nightly aligned one user on, and what it left."""

    fingerprint: str  # of the history aligned on (`jobs.fingerprint`): a change makes the user due
    version: int | None = None  # the production version the night left
    status: str = ""  # how the night ended for them (`jobs.Status`'s word)
    item_ids: tuple[str, ...] | None = None  # the history aligned on; None: a row older than this field
    semantic_profile: str = ""
    scores: tuple[dict, ...] = ()  # every night's prequential score of production: {night, version, score, n}
    at: float = 0.0  # when it was written (epoch seconds)
    seen: int | None = None  # the change mark it consumed (`StateStore.pending`)

    @classmethod
    def from_json(cls, body: str) -> "UserState":
        """A stored row; keys no field has (the user id, a retired field) are ignored."""
        raw = json.loads(body)
        known = {f.name for f in fields(cls)}
        row = {k: v for k, v in raw.items() if k in known}
        for key in ("item_ids", "scores"):
            if row.get(key) is not None:
                row[key] = tuple(row[key])
        return cls(**{"fingerprint": "", **row})

    def to_json(self, user_id: str, seen: int | None) -> str:
        body = {"user_id": user_id, **asdict(self), "seen": seen if seen is not None else self.seen}
        return json.dumps({k: v for k, v in body.items() if v is not None})  # None reads back as the default


class StateStore:
    """The state of one task's users, and the store's change marks, in `<store>/state.db`."""

    def __init__(self, path: Path, task_key: str):
        self.path, self.task_key = Path(path), task_key
        self._ready = False  # the schema is made once per instance, on its first transaction

    @classmethod
    def of(cls, settings: Settings, task_key: str) -> "StateStore":
        """The nightly state of one task's users in the store `settings` names."""
        return cls(settings.state_db, task_key)

    @contextlib.contextmanager
    def _db(self, write: bool = True) -> Iterator[sqlite3.Connection]:
        """A transaction on a connection of its own, closed after it: committed on exit, rolled
        back on an exception. A write takes the database's write lock at once (no upgrade
        deadlock between two writers); a read does not. The rollback journal, not a write-ahead
        log: a WAL's shared-memory file is mapped into the process, and a store on a read-only or
        full disk turns a touch of that mapping into SIGBUS at a random later moment."""
        if not self._ready:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, timeout=60, isolation_level=None)
        try:
            if not self._ready:
                db.execute("PRAGMA journal_mode=DELETE")
                db.executescript(_SCHEMA)
                self._ready = True
            db.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
        finally:
            db.close()

    # -- per-user state ---------------------------------------------------------------------------

    def get(self, user_id: str) -> UserState | None:
        with self._db(write=False) as db:
            row = db.execute("SELECT body FROM state WHERE task = ? AND user_id = ?", (self.task_key, user_id)).fetchone()
        return UserState.from_json(row[0]) if row else None

    def put(self, user_id: str, state: UserState, seen: int | None = None) -> None:
        """Record the user's state; `seen`: the change mark the night planned them at (a change
        marked while they were being aligned stays unseen, for the next night)."""
        body = state.to_json(user_id, seen)
        with self._db() as db:
            db.execute("INSERT INTO state (task, user_id, body) VALUES (?, ?, ?) ON CONFLICT (task, user_id) "
                       "DO UPDATE SET body = excluded.body", (self.task_key, user_id, body))

    def count(self) -> int:
        """Users with a state in this task."""
        with self._db(write=False) as db:
            return db.execute("SELECT count(*) FROM state WHERE task = ?", (self.task_key,)).fetchone()[0]

    def user_ids(self) -> set[str]:
        with self._db(write=False) as db:
            return {r[0] for r in db.execute("SELECT user_id FROM state WHERE task = ?", (self.task_key,))}

    def items(self) -> Iterator[tuple[str, UserState]]:
        """Every user's state in this task (doctor)."""
        with self._db(write=False) as db:
            rows = db.execute("SELECT user_id, body FROM state WHERE task = ?", (self.task_key,)).fetchall()
        return ((user, UserState.from_json(body)) for user, body in rows)

    def tasks(self) -> list[str]:
        with self._db(write=False) as db:
            return [r[0] for r in db.execute("SELECT DISTINCT task FROM state ORDER BY task")]

    def delete(self, user_id: str) -> int:
        """Forget the user in every task, and their change mark; returns the rows removed."""
        with self._db() as db:
            gone = db.execute("DELETE FROM state WHERE user_id = ?", (user_id,)).rowcount
            return gone + db.execute("DELETE FROM changed WHERE user_id = ?", (user_id,)).rowcount

    def compact(self) -> None:
        """Rewrite the database without its free pages (`forget`: a deleted row keeps its bytes)."""
        with contextlib.closing(sqlite3.connect(self.path, timeout=60)) as db:
            db.execute("VACUUM")

    # -- what changed -----------------------------------------------------------------------------

    def mark_changed(self, user_ids: Iterable[str]) -> int:
        """Mark the users' memory as changed (before it is written); returns the new mark."""
        with self._db() as db:
            mark = 1 + (db.execute("SELECT coalesce(max(mark), 0) FROM changed").fetchone()[0])
            db.executemany("INSERT INTO changed (user_id, mark) VALUES (?, ?) ON CONFLICT (user_id) "
                           "DO UPDATE SET mark = excluded.mark", ((u, mark) for u in user_ids))
        return mark

    def pending(self) -> dict[str, int]:
        """Users whose latest change this task has not committed: user -> the change's mark."""
        with self._db(write=False) as db:
            rows = db.execute(
                "SELECT c.user_id, c.mark FROM changed c LEFT JOIN state s ON s.task = ? AND s.user_id = c.user_id "
                "WHERE s.user_id IS NULL OR c.mark > coalesce(json_extract(s.body, '$.seen'), -1)",
                (self.task_key,)).fetchall()
        return dict(rows)

    def saw(self, marks: dict[str, int]) -> None:
        """The users' changes are consumed without a commit (their history was unchanged)."""
        with self._db() as db:
            db.executemany("UPDATE state SET body = json_set(body, '$.seen', ?) WHERE task = ? AND user_id = ?",
                           ((mark, self.task_key, user) for user, mark in marks.items()))

    def latest(self) -> int:
        with self._db(write=False) as db:
            return db.execute("SELECT coalesce(max(mark), 0) FROM changed").fetchone()[0]

    def ready(self, memory_users: Callable[[], Iterable[str]]) -> None:
        """Once per store and task: mark every user in memory, in one transaction (memory written
        before the marks existed, or by something other than `ingest`, is checked once)."""
        key = f"initialized:{self.task_key}"
        with self._db() as db:
            if db.execute("SELECT 1 FROM meta WHERE key = ?", (key,)).fetchone():
                return
            users = list(memory_users())
            mark = 1 + db.execute("SELECT coalesce(max(mark), 0) FROM changed").fetchone()[0]
            db.executemany("INSERT OR IGNORE INTO changed (user_id, mark) VALUES (?, ?)", ((u, mark) for u in users))
            db.execute("INSERT INTO meta (key, value) VALUES (?, ?)", (key, str(mark)))
