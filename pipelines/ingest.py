"""Ingest new interactions into episodic memory, idempotently.

Sources: LaMP/OPPU files (every profile item of every user) or a JSONL event log, one event a
line: `{"user_id", "input", "response", "timestamp", "id"?}`. An event without an id gets one
from a hash of its content, so re-ingesting the same file writes nothing new.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from persona_agent.data.loaders import (Dates, OnBad, check_labels, check_text, check_user_id, load_users, not_utf8,
                                        per_record)
from persona_agent.data.tasks import Task, TaskDataError
from persona_agent.pipelines.memory import EpisodicMemory, MemoryItem, history_items


@dataclass
class IngestReport:
    read: int = 0
    added: int = 0
    updated: int = 0  # known ids whose content changed: the newer version replaced the stored one
    users: int = 0

    @property
    def already_known(self) -> int:
        return self.read - self.added - self.updated


def read_events(path: Path, task: Task, on_bad: OnBad | None = None) -> dict[str, list[MemoryItem]]:
    """user id -> items, from a JSONL event log, validated line by line (a bad line raises, naming
    it, or goes to `on_bad` and is skipped)."""
    by_user: dict[str, dict[str, MemoryItem]] = defaultdict(dict)
    dates, dated = Dates(), {}

    def one(n: int, raw: bytes) -> None:
        where = f"{path}:{n + 1}"
        try:
            e = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as err:
            raise not_utf8(where, err) from None
        except json.JSONDecodeError as err:
            raise TaskDataError(f"{where}: invalid JSON: {err}") from None
        except RecursionError:
            raise TaskDataError(f"{where}: invalid JSON: nested too deeply") from None
        missing = [k for k in ("user_id", "input", "response") if not isinstance(e, dict) or k not in e]
        if missing:
            raise TaskDataError(f"{where}: event lacks {missing}")
        user_id = check_user_id(where, e["user_id"], strings_only=True)
        text = check_text(where, e["input"], "input")
        if not user_id.strip() or not text.strip():
            raise TaskDataError(f"{where}: empty 'user_id' or 'input'")
        response = task.check_gold(e["response"], where)
        check_labels(where, task, text)
        raw_stamp = e.get("timestamp")
        if isinstance(raw_stamp, float):  # unix seconds with a fraction
            raw_stamp = repr(raw_stamp)
        stamp = None if raw_stamp is None else check_text(where, raw_stamp, "timestamp")
        # "latest" needs every item dated or none: a file that mixes them would silently order a
        # user's history by ingestion instead of by time
        dated.setdefault("first", (stamp is not None, where))
        if (stamp is not None) != dated["first"][0]:
            had, at = dated["first"]
            raise TaskDataError(f"{where}: {'a' if stamp is not None else 'no'} 'timestamp', but {at} has "
                                f"{'none' if not had else 'one'}: one file, every event dated or none")
        item_id = check_text(where, e["id"], "id") if e.get("id") is not None else hashlib.sha256(
            f"{user_id}\x00{text}\x00{stamp}".encode()).hexdigest()[:16]
        when = None if stamp is None else dates.read(stamp, where)[0]  # sorts as time does
        item = MemoryItem(item_id, task.query_content(text), response, when)
        if by_user[user_id].setdefault(item_id, item) != item:
            raise TaskDataError(f"{where}: duplicate event id {item_id!r} with different content")

    try:
        with path.open("rb") as f:  # bytes: a badly encoded line is named, not the whole file
            lines = [(n, raw) for n, raw in enumerate(f) if raw.strip()]
    except OSError as err:
        raise TaskDataError(f"{path}: cannot read: {err.strerror or err}") from None
    per_record(lines, lambda _, line: one(*line), on_bad)
    return {user_id: list(items.values()) for user_id, items in by_user.items()}


def read_source(path: Path, task: Task, split: str | None = None, *,
                on_bad: OnBad | None = None) -> dict[str, list[MemoryItem]]:
    if path.suffix == ".jsonl":
        return read_events(path, task, on_bad)
    by_user: dict[str, dict[str, MemoryItem]] = defaultdict(dict)
    for unit in load_users(path, task, split, on_bad=on_bad):  # a user's histories, one per question date: all of them
        by_user[unit.user_id].update((it.item_id, it) for it in history_items(task, unit.history))
    return {user_id: list(items.values()) for user_id, items in by_user.items()}


def ingest(memory: EpisodicMemory, path: Path, task: Task, *, split: str | None = None,
           on_bad: OnBad | None = None, mark_changed: Callable[[list[str]], object] | None = None) -> IngestReport:
    """Validate the whole source first (a bad record writes nothing, or is skipped with
    `on_bad`), then add what is new."""
    return remember_new(memory, read_source(path, task, split, on_bad=on_bad), mark_changed)


def remember_new(memory: EpisodicMemory, source: dict[str, list[MemoryItem]],
                 mark_changed: Callable[[list[str]], object] | None = None) -> IngestReport:
    """Add the items memory does not hold yet (by id), and replace those whose content changed
    (a corrected event: the newer wins, never silently stale); count each kind. `mark_changed`
    is told which users get anything, before any of it is written (what `nightly` plans from)."""
    report, writes = IngestReport(users=len(source)), {}
    for user_id, items in source.items():
        stored = memory.stored(user_id, [it.item_id for it in items])
        new = [it for it in items if it.item_id not in stored]
        changed = [it for it in items if it.item_id in stored and stored[it.item_id] != it]
        report.read += len(items)
        report.added += len(new)
        report.updated += len(changed)
        if new or changed:
            writes[user_id] = new + changed
    if mark_changed is not None and writes:
        mark_changed(list(writes))
    for user_id, items in writes.items():
        memory.add(user_id, items)
    return report
