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

from persona_agent.eval.data import load_users
from persona_agent.eval.tasks import Task, TaskDataError

from .memory import EpisodicMemory, MemoryItem


@dataclass
class IngestReport:
    read: int = 0
    added: int = 0
    users: int = 0

    @property
    def already_known(self) -> int:
        return self.read - self.added


def read_events(path: Path, task: Task) -> dict[str, list[MemoryItem]]:
    """user id -> items, from a JSONL event log (validated line by line)."""
    by_user: dict[str, list[MemoryItem]] = defaultdict(list)
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                e = json.loads(line)
            except json.JSONDecodeError as err:
                raise TaskDataError(f"{path}:{n}: invalid JSON: {err}") from None
            missing = [k for k in ("user_id", "input", "response") if not isinstance(e, dict) or k not in e]
            if missing:
                raise TaskDataError(f"{path}:{n}: event lacks {missing}")
            response = task.check_gold(e["response"], f"{path}:{n}")
            text = task.query_content(str(e["input"]))
            item_id = str(e.get("id") or hashlib.sha256(
                f"{e['user_id']}\x00{e['input']}\x00{e.get('timestamp')}".encode()).hexdigest()[:16])
            by_user[str(e["user_id"])].append(MemoryItem(item_id, text, response, e.get("timestamp")))
    return by_user


def read_source(path: Path, task: Task, split: str | None = None) -> dict[str, list[MemoryItem]]:
    if path.suffix == ".jsonl":
        return read_events(path, task)
    return {u.user_id: [MemoryItem(str(it["id"]), task.item_text(it),
                                   None if task.item_response(it) is None else str(task.item_response(it)).strip().lower(),
                                   it.get("date")) for it in u.profile]
            for u in load_users(path, task, split)}


def ingest(memory: EpisodicMemory, path: Path, task: Task, split: str | None = None) -> IngestReport:
    """Validate the whole source first (a bad record writes nothing), then add what is new."""
    source = read_source(path, task, split)
    report = IngestReport(users=len(source))
    for user_id, items in source.items():
        known = memory.known(user_id, [it.item_id for it in items])
        new = list({it.item_id: it for it in items if it.item_id not in known}.values())
        report.read += len(items)
        report.added += memory.add(user_id, new)
    return report
