"""Checking a store (`doctor`) and copying it whole (`backup`).

`doctor` reads every part back the way the commands do, without changing any of it: each memory
of each user (a truncated page fails only when it is read), each user's memory against the items
their last nightly aligned on (a history that shrank is damage, since nothing but `forget`
deletes a memory), MLflow's database (SQLite's own integrity check), and what crashed writers
can leave behind.

`backup DEST` copies the store while it holds the store's two locks (no `nightly` and no memory
writer runs meanwhile): the memory shard, MLflow's database through SQLite's online backup (a
consistent snapshot, never a half-written page), the nightly state and the artifacts. It is
written beside DEST, `doctor` checks the copy, and only a copy with nothing damaged is renamed
into place: a damaged store leaves nothing at DEST (a backup of damage would restore it). Sparse
files (the shard's preallocated pages) stay sparse, and the disk's free space is checked first.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import sqlite3
from dataclasses import dataclass, replace
from pathlib import Path

from persona_agent.adapters.points import EdgePoints
from persona_agent.adapters.state import StateStore
from persona_agent.data.loaders import shown
from persona_agent.pipelines.memory import payload_problem
from persona_agent.pipelines.points import StoreDamaged, StoreLocked
from persona_agent.runtime.erasures import unfinished, unfinished_erases
from persona_agent.runtime.progress import progress_bar
from persona_agent.runtime.store import StoreBusy, StoreFull, exclusive, refuse_pre_release
from persona_agent.settings import Settings, sqlite_file


class BackupRefused(RuntimeError):
    """The store's copy was damaged: nothing was left at the destination."""


@dataclass(frozen=True)
class Finding:
    part: str  # memory, history, state, tracking, leftovers
    status: str  # ok, damaged, unfinished (an erase), leftover, skipped
    detail: str
    fix: str = ""


# What an interrupted writer leaves: an import or backup cut short, a half-built database, an
# atomic write's temporary file (`.<name>.<random>`, never renamed into place).
LEFTOVERS = ("*.partial", ".mlflow.db.*.tmp", "eval/*/.*", "reports/.*")


def doctor(settings: Settings, tracking_uri: str | None = None) -> list[Finding]:
    """Every finding about the store (and its tracking database: `tracking_uri`, default the
    store's); none changes it."""
    if not settings.store.is_dir():
        raise FileNotFoundError(2, "no store here", str(settings.store))
    refuse_pre_release(settings)
    with exclusive(settings):
        found, memory_ids = _memory(settings)
        found += _history(settings, memory_ids) + _erases(settings.store)
    return found + [_tracking(tracking_uri or settings.tracking_uri), _leftovers(settings.store)]


def _erases(store: Path) -> list[Finding]:
    """An erase that stopped half way (`forget`'s journal): only `forget` of that id finishes it."""
    return [Finding("erase", "unfinished",
                    f"an erase begun {e['at']} did not finish: removed {', '.join(e['done']) or 'nothing yet'}"
                    + (f" ({e['error'][:120]})" if e.get("error") else ""),
                    "run `persona-agent forget USER` again with that user's id: it finishes the erase (the journal "
                    "holds only a hash of it); restoring a backup would bring the user back")
            for e in unfinished_erases(store)]


def _memory(settings: Settings) -> tuple[list[Finding], dict[str, set[str]] | None]:
    path = settings.qdrant_path
    if settings.qdrant_url:
        return [Finding("memory", "skipped", f"a Qdrant server ({settings.qdrant_url}): check it with its own tools")], None
    if not path.exists():
        return [Finding("memory", "ok", "none yet")], None
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
        ids, bad = {}, []
        for user in points.user_ids():  # each payload once: its id kept, its checksum checked
            payloads = points.payloads(user)
            ids[user] = {p.get("item_id") for p in payloads}
            bad += [problem for p in payloads if (problem := payload_problem(p))]
        total = points.count()
        if bad:
            return [Finding("memory", "damaged", f"{len(bad)} memories changed on disk; the first: {bad[0]}",
                            _RESTORE)], None
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
    found, journal = [], unfinished(settings.store)
    try:
        states = StateStore(settings.state_db, "")
        tasks = states.tasks()
        for task in tasks:
            shrank, users = [], 0
            for user, state in StateStore(settings.state_db, task).items():
                users += 1
                aligned_on = set(state.item_ids or ())
                if memory_ids is not None and (missing := aligned_on - memory_ids.get(user, set())):
                    if journal and journal.get(user):  # an erase stopped between memory and state
                        continue
                    shrank.append(f"{shown(user)} ({len(missing)} of {len(aligned_on)} missing)")
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
        with exclusive(settings), progress_bar(every=settings.progress_every) as progress:
            bar = progress.add_task("backup: files", total=4)  # files, memory, state, tracking; then the copy's check
            _room_for(settings.store, dest)
            skip = {settings.qdrant_path.name, "mlflow.db", "memory.lock", "nightly.lock", "mlflow.db.lock",
                    "state.db", "state.db-wal", "state.db-shm"}
            shutil.copytree(settings.store, partial, symlinks=True, copy_function=_sparse_copy,
                            ignore=lambda d, names: [n for n in names if Path(d) == settings.store and n in skip
                                                     or n.endswith((".partial", ".tmp"))])
            progress.update(bar, advance=1, description="backup: memory")
            if settings.qdrant_path.exists():  # opened (so no process outside persona-agent writes it) and flushed
                points = EdgePoints(settings.qdrant_path)
                try:
                    points.shard.flush()
                    shutil.copytree(settings.qdrant_path, partial / settings.qdrant_path.name, copy_function=_sparse_copy)
                finally:
                    points.close()
            progress.update(bar, advance=1, description="backup: state")
            if settings.state_db.exists():  # SQLite's online backup: the write-ahead log's rows included
                _sqlite_copy(settings.state_db, partial / settings.state_db.name)
            progress.update(bar, advance=1, description="backup: tracking")
            database = sqlite_file(settings.tracking_uri)
            if local := database is not None and database.exists():
                _sqlite_copy(database, partial / "mlflow.db")
            progress.update(bar, advance=1, description="backup: copied")
        copy = replace(settings, store=partial, store_wait=0.0)
        findings = doctor(copy, f"sqlite:///{partial.resolve() / 'mlflow.db'}" if local else settings.tracking_uri)
        if damaged := [f for f in findings if f.status == "damaged"]:
            raise BackupRefused(f"{settings.store} is damaged ({'; '.join(f'{f.part}: {f.detail}' for f in damaged)}"
                                f"); nothing was left at {dest}: `persona-agent doctor --store {settings.store}` "
                                "says what to do")
        partial.rename(dest)
    except StoreDamaged as err:  # the source's memory cannot even be opened
        shutil.rmtree(partial, ignore_errors=True)
        raise BackupRefused(f"{err}; nothing was left at {dest}: `persona-agent doctor --store {settings.store}` "
                            "says what to do") from None
    except shutil.Error as err:  # copytree gathers every file's error: say the one that matters, once
        shutil.rmtree(partial, ignore_errors=True)
        full = any(isinstance(e, tuple) and len(e) == 3 and "No space left" in str(e[2]) for e in err.args[0])
        raise OSError(errno.ENOSPC if full else errno.EIO, ("the disk is full; " if full else f"{err.args[0][0][2]}; ")
                      + "nothing was backed up", str(dest)) from None
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return [replace(f, detail=f.detail.replace(str(partial), str(dest))) for f in findings]


def _room_for(store: Path, dest: Path) -> None:
    """Refuse up front when the copy cannot fit: the space the store's files really take (a
    sparse file's holes take none) against what dest's disk has free."""
    needed = sum(p.lstat().st_blocks * 512 for p in store.rglob("*") if p.is_file() and not p.is_symlink())
    probe = dest.parent
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if needed > free:
        raise StoreFull(f"{dest}: the backup needs {needed / 2**20:.1f} MB and its disk has {free / 2**20:.1f} MB free; "
                        "nothing was backed up")


def _sparse_copy(src: str, dst: str, *, follow_symlinks: bool = True) -> str:
    """`shutil.copy2`, but a file's holes stay holes (Qdrant preallocates its pages: a 1.5 MB
    store on disk is 140 MB read through)."""
    with open(src, "rb") as fi, open(dst, "wb") as fo:
        size, fd, pos = os.fstat(fi.fileno()).st_size, fi.fileno(), 0
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as err:
                if err.errno == errno.ENXIO:  # nothing but a hole to the end
                    break
                raise
            end = os.lseek(fd, start, os.SEEK_HOLE)
            fi.seek(start)
            fo.seek(start)
            while start < end:
                chunk = fi.read(min(1 << 20, end - start))
                if not chunk:
                    break
                fo.write(chunk)
                start += len(chunk)
            pos = end
        fo.truncate(size)
    shutil.copystat(src, dst, follow_symlinks=follow_symlinks)
    return dst


def _sqlite_copy(source: Path, target: Path) -> None:
    with contextlib.closing(sqlite3.connect(f"file:{source}?mode=ro", uri=True)) as src, \
            contextlib.closing(sqlite3.connect(target)) as out:
        src.backup(out)


def print_findings(findings: list[Finding]) -> None:
    width = max(len(f.part) for f in findings)
    for f in findings:
        print(f"{f.status:<8}  {f.part:<{width}}  {f.detail}" + (f"\n{'':<8}  {'':<{width}}  -> {f.fix}" if f.fix else ""))
