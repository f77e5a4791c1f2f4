"""Checking a store (`doctor`) and copying it whole (`backup`).

`doctor` reads every part back the way the commands do, without changing any of it: each memory
of each user (a truncated page fails only when it is read), each user's memory against the items
their last nightly aligned on (a history that shrank is damage, since nothing but `forget`
deletes a memory), MLflow's database (SQLite's own integrity check), and what crashed writers
can leave behind.

`backup DEST` copies the store while it holds the store's two locks (no `nightly` and no memory
writer runs meanwhile): the memory shard, MLflow's database through SQLite's online backup (a
consistent snapshot, never a half-written page), the nightly state and the artifacts. It is
written beside DEST and renamed into place, and `doctor` checks the copy before it is called done.
"""

from __future__ import annotations

import contextlib
import shutil
import sqlite3
from dataclasses import dataclass, replace
from pathlib import Path

from persona_agent.pipelines.points import EdgePoints, StoreDamaged, StoreLocked
from persona_agent.runtime.settings import Settings, sqlite_file
from persona_agent.runtime.state import StateStore
from persona_agent.runtime.store import StoreBusy, exclusive


@dataclass(frozen=True)
class Finding:
    part: str  # memory, history, state, tracking, leftovers
    status: str  # ok, damaged, leftover, skipped
    detail: str
    fix: str = ""


# What an interrupted writer leaves: an import or backup cut short, a half-built database, an
# atomic write's temporary file (`.<name>.<random>`, never renamed into place).
LEFTOVERS = ("*.partial", ".mlflow.db.*.tmp", "nightly/*/.*.json.*", "eval/*/.*", "reports/.*")


def doctor(settings: Settings, tracking_uri: str | None = None) -> list[Finding]:
    """Every finding about the store (and its tracking database: `tracking_uri`, default the
    store's); none changes it."""
    if not settings.store.is_dir():
        raise FileNotFoundError(2, "no store here", str(settings.store))
    with exclusive(settings):
        found, memory_ids = _memory(settings)
        found += _history(settings, memory_ids)
    return found + [_tracking(tracking_uri or settings.tracking_uri), _leftovers(settings.store)]


def _memory(settings: Settings) -> tuple[list[Finding], dict[str, set[str]] | None]:
    path = settings.qdrant_path
    if settings.qdrant_url:
        return [Finding("memory", "skipped", f"a Qdrant server ({settings.qdrant_url}): check it with its own tools")], None
    if not path.exists():
        legacy = settings.legacy_qdrant_path.exists()
        return [Finding("memory", "ok", "none yet" + (f" (an earlier version's at {settings.legacy_qdrant_path}, "
                                                       "copied in by the next command that reads memory)" if legacy else ""))], None
    if path.is_dir() and not (path / "edge_config.json").exists() and not any(path.iterdir()):
        return [Finding("memory", "ok", "an empty folder: none yet")], None
    try:
        points = EdgePoints(path)
    except StoreLocked:
        raise StoreBusy(f"the memory of {settings.store} is open in a process outside persona-agent; close it "
                        "there first") from None
    except StoreDamaged as err:
        return [Finding("memory", "damaged", err.reason, _RESTORE)], None
    try:
        ids = {user: {p.get("item_id") for p in points.payloads(user)} for user in points.user_ids()}
        total = points.count()
    except StoreDamaged as err:
        return [Finding("memory", "damaged", err.reason, _RESTORE)], None
    finally:
        points.close()
    read = sum(len(v) for v in ids.values())
    if read != total:
        return [Finding("memory", "damaged", f"{total} memories counted, {read} read back by user", _RESTORE)], ids
    return [Finding("memory", "ok", f"{total} memories of {len(ids)} users, every one read back")], ids


def _history(settings: Settings, memory_ids: dict[str, set[str]] | None) -> list[Finding]:
    """Each user's memory against what their last nightly aligned on, per task."""
    if not settings.state_db.exists():
        return []
    found = []
    try:
        states = StateStore(settings.state_db, "")
        tasks = states.tasks()
        for task in tasks:
            shrank, users = [], 0
            for user, state in StateStore(settings.state_db, task).items():
                users += 1
                aligned_on = set(state.get("item_ids", ()))
                if memory_ids is not None and (missing := aligned_on - memory_ids.get(user, set())):
                    shrank.append(f"{user} ({len(missing)} of {len(aligned_on)} missing)")
            if shrank:
                found.append(Finding("history", "damaged", f"{task}: history shrank for {len(shrank)} users: "
                                     + ", ".join(shrank[:5]) + (" ..." if len(shrank) > 5 else ""), _RESTORE))
            else:
                checked = "checked against memory" if memory_ids is not None else "memory not checked"
                found.append(Finding("history", "ok", f"{task}: {users} users' nightly state, {checked}"))
    except sqlite3.DatabaseError as err:
        found.append(Finding("state", "damaged", f"{settings.state_db}: {err}", _RESTORE))
    return found


def _tracking(uri: str) -> Finding:
    if (path := sqlite_file(uri)) is None:
        return Finding("tracking", "skipped", f"{uri}: a tracking server, checked by its own tools")
    if not path.exists():
        return Finding("tracking", "ok", "no database yet")
    if path.is_dir():
        return Finding("tracking", "damaged", f"{path} is a folder", f"move {path} aside")
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
            verdict = [row[0] for row in db.execute("PRAGMA quick_check")]
            runs = db.execute("SELECT count(*) FROM runs").fetchone()[0]
    except sqlite3.Error as err:
        return Finding("tracking", "damaged", f"{path}: {err}", _RESTORE)
    if verdict != ["ok"]:
        return Finding("tracking", "damaged", f"{path}: " + "; ".join(verdict[:3]), _RESTORE)
    return Finding("tracking", "ok", f"{path.name}: SQLite's integrity check passes; {runs} runs")


def _leftovers(store: Path) -> Finding:
    paths = sorted({p for pattern in LEFTOVERS for p in store.glob(pattern)})
    if not paths:
        return Finding("leftovers", "ok", "none")
    names = " ".join(str(p) for p in paths)
    return Finding("leftovers", "leftover", f"{len(paths)} left by interrupted writes: {names[:300]}",
                   "harmless; remove them when no command runs on the store")


_RESTORE = "restore the store from a `persona-agent backup` (see docs/operations.md, Backups)"


def backup(settings: Settings, dest: Path) -> list[Finding]:
    """A consistent copy of the store at `dest` (which must not exist); `doctor`'s findings on it."""
    if dest.exists():
        raise FileExistsError(17, "already exists; a backup goes to a new path", str(dest))
    if dest.resolve().is_relative_to(settings.store.resolve()):
        raise ValueError(f"{dest} is inside the store {settings.store}; back it up somewhere else")
    partial = dest.with_name(dest.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        with exclusive(settings):
            skip = {settings.qdrant_path.name, "mlflow.db", "memory.lock", "nightly.lock", "mlflow.db.lock",
                    "state.db", "state.db-wal", "state.db-shm"}
            shutil.copytree(settings.store, partial, symlinks=True,
                            ignore=lambda d, names: [n for n in names if Path(d) == settings.store and n in skip
                                                     or n.endswith((".partial", ".tmp"))])
            if settings.qdrant_path.exists():  # opened (so no process outside persona-agent writes it) and flushed
                points = EdgePoints(settings.qdrant_path)
                try:
                    points.shard.flush()
                    shutil.copytree(settings.qdrant_path, partial / settings.qdrant_path.name)
                finally:
                    points.close()
            if settings.state_db.exists():  # SQLite's online backup: the write-ahead log's rows included
                _sqlite_copy(settings.state_db, partial / settings.state_db.name)
            database = sqlite_file(settings.tracking_uri)
            if local := database is not None and database.exists():
                _sqlite_copy(database, partial / "mlflow.db")
        partial.rename(dest)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    copy = replace(settings, store=dest, store_wait=0.0)
    return doctor(copy, f"sqlite:///{dest.resolve() / 'mlflow.db'}" if local else settings.tracking_uri)


def _sqlite_copy(source: Path, target: Path) -> None:
    with contextlib.closing(sqlite3.connect(f"file:{source}?mode=ro", uri=True)) as src, \
            contextlib.closing(sqlite3.connect(target)) as out:
        src.backup(out)


def print_findings(findings: list[Finding]) -> None:
    width = max(len(f.part) for f in findings)
    for f in findings:
        print(f"{f.status:<8}  {f.part:<{width}}  {f.detail}" + (f"\n{'':<8}  {'':<{width}}  -> {f.fix}" if f.fix else ""))
