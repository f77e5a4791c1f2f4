"""What the last completed nightly aligned each user on, per task: read by `nightly` to plan,
by `answer` to notice a history that shrank, and removed by `forget`."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from persona_agent.data.atomic import atomic_write_text

log = logging.getLogger(__name__)


class StateStore:
    """One small JSON file per user: what the last completed nightly aligned them on."""

    def __init__(self, root: Path):
        self.root = root

    def _path(self, user_id: str) -> Path:
        return self.root / (hashlib.sha256(user_id.encode()).hexdigest()[:32] + ".json")

    def get(self, user_id: str) -> dict | None:
        path = self._path(user_id)
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except json.JSONDecodeError:  # cannot happen with atomic writes; treat as not done
            log.warning("state of user %s is unreadable; they will be re-aligned", user_id)
            return None

    def user_ids(self) -> set[str]:
        """Every user with a state (one read per user)."""
        ids = set()
        for path in self.root.glob("*.json") if self.root.exists() else ():
            try:
                ids.add(json.loads(path.read_text(encoding="utf-8"))["user_id"])
            except (OSError, ValueError, KeyError):
                continue  # unreadable: `get` says so for its user
        return ids

    def put(self, user_id: str, state: dict) -> None:
        atomic_write_text(self._path(user_id), json.dumps({"user_id": user_id, **state}))

    def delete(self, user_id: str) -> bool:
        """Forget the user's state; False when there was none."""
        try:
            self._path(user_id).unlink()
            return True
        except FileNotFoundError:
            return False
