"""Episodic memory: each user's past interactions in Qdrant, searched top-K, always per user.

Retrieval is lexical by default (BM25-style sparse vectors with Qdrant's IDF modifier), so it
needs no model and no network. Give an `Embedder` to add dense vectors; queries then fuse both
with reciprocal-rank fusion. The same code runs on Qdrant Edge in process (a local path, the
default) or a Qdrant server (`persona_agent/adapters/points.py`).
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
import re
import uuid
import zlib
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

from persona_agent.data.tasks import Task
from persona_agent.pipelines.points import Point, PointStore, Sparse, StoreDamaged

Embedder = Callable[[list[str]], Sequence[Sequence[float]]]

_TOKEN = re.compile(r"[a-z0-9]+")
_STOPWORDS = frozenset(
    "a an and are as at be by for from has have in is it its of on or that the this to was were will with "
    "about after into over than then there these they we you your i me my he she his her our".split())
_K1 = 1.2  # BM25 term-frequency saturation
_NAMESPACE = uuid.UUID("6f1c3f5e-8a43-4a7b-9d38-3d5e0f9b1a27")


def sparse_vector(text: str, query: bool = False) -> Sparse:
    """Hash tokens to indices; values are BM25's saturated term frequency (1 per term for a
    query). Qdrant's IDF modifier supplies the inverse document frequency at search time."""
    counts = Counter(_hash(t) for t in _TOKEN.findall(text.lower()) if t not in _STOPWORDS)
    values = {i: 1.0 if query else tf * (_K1 + 1) / (tf + _K1) for i, tf in counts.items()}
    return list(values), list(values.values())


def _hash(token: str) -> int:
    return zlib.crc32(token.encode()) & 0x7FFFFFFF


@dataclass(frozen=True)
class MemoryItem:
    """One past interaction: the item the user saw and their own response to it."""

    item_id: str
    text: str
    response: str | None = None
    date: str | None = None


@dataclass(frozen=True)
class Recall:
    item: MemoryItem
    score: float


def point_id(user_id: str, item_id: str) -> str:
    """Deterministic, so re-adding an item overwrites it instead of duplicating it; the pair is
    JSON-encoded so no (user, item) can be crafted to hit another user's point."""
    return str(uuid.uuid5(_NAMESPACE, json.dumps([user_id, item_id])))


class EpisodicMemory:
    """All users' memories in one point store; every read is filtered to exactly one user."""

    def __init__(self, points: PointStore, embedder: Embedder | None = None):
        self.points, self.embedder = points, embedder

    def close(self) -> None:
        self.points.close()

    def add(self, user_id: str, items: Iterable[MemoryItem], batch_size: int = 256) -> int:
        """Upsert a user's items (idempotent by item id); returns how many were written. Each
        point records when it was added (`seq`), so undated items keep ingestion order."""
        items = list(items)
        seq = self.count(user_id)
        for start in range(0, len(items), batch_size):
            batch = items[start:start + batch_size]
            kept = {it.item_id: s for s, it in self._stored(user_id, [it.item_id for it in batch])}  # a rewrite keeps its place
            dense = self.embedder([it.text for it in batch]) if self.embedder else [None] * len(batch)
            points = []
            for it, vec in zip(batch, dense):
                payload = {"user_id": user_id, "item_id": it.item_id, "text": it.text,
                           "response": it.response, "date": it.date, "seq": kept.get(it.item_id, seq)}
                payload["sum"] = checksum(payload)
                seq += it.item_id not in kept
                points.append(Point(point_id(user_id, it.item_id), sparse_vector(it.text),
                                    None if vec is None else list(map(float, vec)), payload))
            self.points.upsert(points)
        return len(items)

    def search(self, user_id: str, text: str, k: int, exclude: Iterable[str] = ()) -> list[Recall]:
        """Top-k of this user's memories for `text`, never another user's; `exclude` drops item
        ids (the interaction being simulated must not find its own answer)."""
        if k <= 0 or not text.strip():
            return []
        dense = list(map(float, self.embedder([text])[0])) if self.embedder is not None else None
        # Fetch past k and break score ties by item id: without that, equal scores come back in
        # storage order, which differs between a fresh and a reopened store, and so would prompts.
        hits = self.points.search(user_id, sparse_vector(text, query=True), dense, 2 * k,
                                  [point_id(user_id, i) for i in exclude])
        hits = sorted(hits, key=lambda h: (-round(h[0], 5), h[1]["item_id"]))[:k]
        return [Recall(self._item(payload), score) for score, payload in hits if payload.get("user_id") == user_id]

    def items(self, user_id: str) -> list[MemoryItem]:
        """All of a user's memories, oldest first (see `in_time_order`)."""
        return in_time_order([(p.get("seq", 0), self._item(p)) for p in self.points.payloads(user_id)
                              if p.get("user_id") == user_id])

    def user_ids(self) -> list[str]:
        """Every user with memories, sorted."""
        return self.points.user_ids()

    def stored(self, user_id: str, item_ids: Iterable[str]) -> dict[str, MemoryItem]:
        """The user's stored items among these ids, by id."""
        return {it.item_id: it for _, it in self._stored(user_id, item_ids)}

    def _stored(self, user_id: str, item_ids: Iterable[str]) -> list[tuple[int, MemoryItem]]:
        ids = list({point_id(user_id, i) for i in item_ids})
        return [(p.get("seq", 0), self._item(p)) for p in self.points.payloads(user_id, ids)] if ids else []

    def _item(self, payload: dict) -> MemoryItem:
        if (problem := payload_problem(payload)) is not None:
            raise StoreDamaged(getattr(self.points, "root", "the memory server"), problem)
        return _item(payload)

    def count(self, user_id: str | None = None) -> int:
        return self.points.count(user_id)

    def forget(self, user_id: str) -> int:
        """Remove every memory of the user (`persona-agent forget`); returns how many there were."""
        return self.points.delete_user(user_id)


def history_items(task: Task, profile: list[dict]) -> list[MemoryItem]:
    """A LaMP/OPPU profile as memory items, in the profile's (time) order: the text the task
    shows of each item, and the user's own response normalised as golds are."""
    def response(item: dict) -> str | None:
        r = task.item_response(item)
        return None if r is None else str(r).strip().lower()

    return [MemoryItem(str(it["id"]), task.item_text(it), response(it), it.get("date")) for it in profile]


def in_time_order(sequenced: list[tuple[int, MemoryItem]]) -> list[MemoryItem]:
    """Items by date when every one has a date, else in the order they were added; never by the
    text of their ids ("999" would come after "1000")."""
    dated = all(it.date is not None for _, it in sequenced)
    return [it for _, it in sorted(sequenced, key=lambda p: (p[1].date, p[0]) if dated else p[0])]


def checksum(payload: dict) -> str:
    """What a memory's content hashes to (its user, id, text, response and date): stored with it,
    so a byte that changed on disk is found when it is read, not answered from."""
    content = [payload.get(k) for k in ("user_id", "item_id", "text", "response", "date")]
    return hashlib.sha256(json.dumps(content, ensure_ascii=False).encode()).hexdigest()[:16]


def payload_problem(payload: dict) -> str | None:
    """Why a stored memory cannot be trusted, or None. One written before checksums has none
    and is taken as it is."""
    if "sum" in payload and payload["sum"] != checksum(payload):
        return (f"a memory of {payload.get('user_id')!r} (item {payload.get('item_id')!r}) no longer matches the "
                "checksum written with it: its bytes changed on disk")
    return None


def _item(payload: dict) -> MemoryItem:
    return MemoryItem(payload["item_id"], payload["text"], payload.get("response"), payload.get("date"))


_excluded: contextvars.ContextVar[frozenset[str]] = contextvars.ContextVar("excluded_memories", default=frozenset())


class UserMemory:
    """One user's view of episodic memory, as the agent's tools see it.

    A view is a handle, not state: deep copies of a program (DSPy makes them when optimizing)
    share it, as do the tool closures built over it. `exclude` hides items from every search
    through this view, across threads (the `excluding` context hides them in this context only).
    """

    def __init__(self, memory: EpisodicMemory, user_id: str, k: int):
        self.memory, self.user_id, self.k = memory, user_id, k
        self.exclude: frozenset[str] = frozenset()

    def __deepcopy__(self, memo):
        return self

    def search(self, text: str, k: int | None = None) -> list[Recall]:
        return self.memory.search(self.user_id, text, self.k if k is None else k, exclude=self.exclude | _excluded.get())

    @staticmethod
    @contextlib.contextmanager
    def excluding(item_ids: Iterable[str]):
        """Hide these items from every search in this context (used when replaying history)."""
        token = _excluded.set(_excluded.get() | frozenset(item_ids))
        try:
            yield
        finally:
            _excluded.reset(token)


def format_recalls(recalls: Sequence[Recall]) -> str:
    if not recalls:
        return "(no related past interactions)"
    return "\n".join(f"- {r.item.text} -> {r.item.response}" if r.item.response is not None else f"- {r.item.text}"
                     for r in recalls)
