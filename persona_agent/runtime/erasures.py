"""The store's erase journal (`forgetting.json`): which users an erase began for and has not
finished. `forget` writes it (operations/forget.py); `nightly`, `answer` and `doctor` read it, to
leave such a user alone until the erase is run again and finishes."""

from __future__ import annotations

import contextlib
import hashlib
import json
import secrets
import time
from collections import Counter
from pathlib import Path

from persona_agent.data.atomic import atomic_write_text
from persona_agent.pipelines.points import StoreDamaged


class Journal:
    """Unfinished erases, by a hash of the id salted for the journal alone (so a store that
    never forgot anyone gets no salt file from an id no user has): {"salt", "erases": {hash:
    {"at", "done", "removed", "error"}}}. Written atomically; removed when empty."""

    def __init__(self, store: Path):
        self.path = store / JOURNAL
        self.data = {"salt": secrets.token_hex(16), "erases": {}}
        if self.path.exists():  # written atomically: unreadable means damaged, and who is half erased is unknown
            try:
                self.data = json.loads(self.path.read_text(encoding="utf-8"))
                if not (isinstance(self.data.get("erases"), dict) and isinstance(self.data.get("salt"), str)):
                    raise ValueError("not a journal")
            except (ValueError, AttributeError) as err:
                raise StoreDamaged(self.path, f"the erase journal cannot be read ({type(err).__name__})") from None

    def key(self, user_id: str) -> str:
        return hashlib.sha256((self.data["salt"] + user_id).encode()).hexdigest()[:32]

    def get(self, user_id: str) -> dict | None:
        return self.data["erases"].get(self.key(user_id))

    def begin(self, user_id: str) -> dict:
        entry = self.data["erases"].setdefault(self.key(user_id), {
            "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "done": [], "removed": {}})
        self._save()  # the intent, before the first byte of theirs goes
        return entry

    def mark(self, entry: dict, step: str, removed: Counter) -> None:
        entry["done"] = [*dict.fromkeys([*entry["done"], step])]
        entry["removed"] = dict(+removed)
        self._save()

    def stopped(self, entry: dict, removed: Counter, err: BaseException) -> None:
        entry["removed"], entry["error"] = dict(+removed), " ".join(f"{type(err).__name__}: {err}".split())[:300]
        with contextlib.suppress(OSError):  # a store that cannot be written keeps the intent written first
            self._save()

    def end(self, user_id: str) -> None:
        self.data["erases"].pop(self.key(user_id), None)
        if self.data["erases"]:
            self._save()
        else:
            self.path.unlink(missing_ok=True)

    def _save(self) -> None:
        atomic_write_text(self.path, json.dumps(self.data))


JOURNAL = "forgetting.json"


def being_forgotten(store: Path, user_id: str) -> dict | None:
    """The unfinished erase of `user_id` (when it began, what it removed), or None."""
    return journal.get(user_id) if (journal := unfinished(store)) else None


def unfinished(store: Path) -> Journal | None:
    """The store's unfinished erases, read once (for asking about many users), or None."""
    return Journal(store) if (store / JOURNAL).exists() else None


def unfinished_erases(store: Path) -> list[dict]:
    return list(journal.data["erases"].values()) if (journal := unfinished(store)) else []
