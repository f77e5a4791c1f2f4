"""Episodic memory: each user's past interactions in Qdrant, searched top-K, always per user.

Retrieval is lexical by default (BM25-style sparse vectors with Qdrant's IDF modifier), so it
needs no model and no network. Give an `Embedder` to add dense vectors; queries then fuse both
with reciprocal-rank fusion. The same code runs on embedded Qdrant (a local path) or a server.
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

from qdrant_client import QdrantClient, models

from persona_agent.eval.tasks import Task

Embedder = Callable[[list[str]], Sequence[Sequence[float]]]

_TOKEN = re.compile(r"[a-z0-9]+")
_STOPWORDS = frozenset(
    "a an and are as at be by for from has have in is it its of on or that the this to was were will with "
    "about after into over than then there these they we you your i me my he she his her our".split())
_K1 = 1.2  # BM25 term-frequency saturation
_NAMESPACE = uuid.UUID("6f1c3f5e-8a43-4a7b-9d38-3d5e0f9b1a27")


def sparse_vector(text: str, query: bool = False) -> models.SparseVector:
    """Hash tokens to indices; values are BM25's saturated term frequency (1 per term for a
    query). Qdrant's IDF modifier supplies the inverse document frequency at search time."""
    counts = Counter(_hash(t) for t in _TOKEN.findall(text.lower()) if t not in _STOPWORDS)
    values = {i: 1.0 if query else tf * (_K1 + 1) / (tf + _K1) for i, tf in counts.items()}
    return models.SparseVector(indices=list(values), values=list(values.values()))


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
    """All users' memories in one collection; every read is filtered to exactly one user."""

    def __init__(self, client: QdrantClient, collection: str = "episodic", embedder: Embedder | None = None,
                 layout: str | None = None):
        """layout: "shared" (one collection, filtered by user: a server's tenant index makes that
        fast) or "per_user" (a collection per user: embedded Qdrant searches by brute force, so
        a search then scans only that user's memories). Default: per_user embedded, shared on a
        server."""
        self.client, self.collection, self.embedder = client, collection, embedder
        self.layout = layout or ("per_user" if self._is_local else "shared")
        if self.layout not in ("shared", "per_user"):
            raise ValueError(f"layout must be 'shared' or 'per_user', not {self.layout!r}")
        self._ready: set[str] = set()

    @classmethod
    def open(cls, path: str | None = None, url: str | None = None, **kwargs) -> "EpisodicMemory":
        """Embedded Qdrant at `path` (":memory:" for a throwaway store), or a server at `url`."""
        client = QdrantClient(url=url) if url else QdrantClient(path=path or ":memory:")
        return cls(client, **kwargs)

    def close(self) -> None:
        self.client.close()

    def _name(self, user_id: str) -> str:
        if self.layout == "shared":
            return self.collection
        return f"{self.collection}-{hashlib.sha256(user_id.encode()).hexdigest()[:24]}"

    def _exists(self, name: str) -> bool:
        if name not in self._ready and self.client.collection_exists(name):
            self._ready.add(name)
        return name in self._ready

    def _ensure(self, name: str) -> str:
        if self._exists(name):
            return name
        dense = {}
        if self.embedder is not None:
            size = len(self.embedder(["probe"])[0])
            dense = {"dense": models.VectorParams(size=size, distance=models.Distance.COSINE)}
        self.client.create_collection(
            name, vectors_config=dense,
            sparse_vectors_config={"lexical": models.SparseVectorParams(modifier=models.Modifier.IDF)},
        )
        if not self._is_local:
            # On a server, user_id is the tenant key: indexed, and co-located per tenant.
            self.client.create_payload_index(
                name, "user_id", field_schema=models.KeywordIndexParams(type=models.KeywordIndexType.KEYWORD, is_tenant=True))
        self._ready.add(name)
        return name

    def _collections(self) -> list[str]:
        if self.layout == "shared":
            return [self.collection] if self._exists(self.collection) else []
        prefix = f"{self.collection}-"
        return [c.name for c in self.client.get_collections().collections if c.name.startswith(prefix)]

    @property
    def _is_local(self) -> bool:
        return type(self.client._client).__name__ == "QdrantLocal"

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
                vector = {"lexical": sparse_vector(it.text)}
                if vec is not None:
                    vector["dense"] = list(map(float, vec))
                payload = {"user_id": user_id, "item_id": it.item_id, "text": it.text,
                           "response": it.response, "date": it.date, "seq": kept.get(it.item_id, seq)}
                seq += it.item_id not in kept
                points.append(models.PointStruct(id=point_id(user_id, it.item_id), vector=vector, payload=payload))
            self.client.upsert(self._ensure(self._name(user_id)), points=points, wait=True)
        return len(items)

    def search(self, user_id: str, text: str, k: int, exclude: Iterable[str] = ()) -> list[Recall]:
        """Top-k of this user's memories for `text`, never another user's; `exclude` drops item
        ids (the interaction being simulated must not find its own answer)."""
        name = self._name(user_id)
        if k <= 0 or not text.strip() or not self._exists(name):
            return []
        flt = models.Filter(
            must=[models.FieldCondition(key="user_id", match=models.MatchValue(value=user_id))],
            must_not=[models.HasIdCondition(has_id=[point_id(user_id, i) for i in exclude])] if exclude else None,
        )
        lexical = models.SparseVector(**sparse_vector(text, query=True).model_dump())
        # Fetch past k and break score ties by item id: without that, equal scores come back in
        # storage order, which differs between a fresh and a reopened store, and so would prompts.
        if self.embedder is None:
            hits = self.client.query_points(name, query=lexical, using="lexical", query_filter=flt,
                                            limit=2 * k, with_payload=True).points
        else:
            dense = list(map(float, self.embedder([text])[0]))
            hits = self.client.query_points(
                name,
                prefetch=[models.Prefetch(query=lexical, using="lexical", filter=flt, limit=4 * k),
                          models.Prefetch(query=dense, using="dense", filter=flt, limit=4 * k)],
                query=models.FusionQuery(fusion=models.Fusion.RRF), query_filter=flt, limit=2 * k, with_payload=True,
            ).points
        hits = sorted(hits, key=lambda h: (-round(h.score, 5), h.payload["item_id"]))[:k]
        return [Recall(_item(h.payload), h.score) for h in hits if h.payload.get("user_id") == user_id]

    def items(self, user_id: str) -> list[MemoryItem]:
        """All of a user's memories, oldest first (see `in_time_order`)."""
        flt = models.Filter(must=[models.FieldCondition(key="user_id", match=models.MatchValue(value=user_id))])
        name, out, offset = self._name(user_id), [], None
        if not self._exists(name):
            return []
        while True:
            points, offset = self.client.scroll(name, scroll_filter=flt, limit=1024, offset=offset,
                                                with_payload=True)
            out.extend((p.payload.get("seq", 0), _item(p.payload)) for p in points)
            if offset is None:
                return in_time_order(out)

    def user_ids(self) -> list[str]:
        """Every user with memories, sorted."""
        users = set()
        for name in self._collections():
            offset = None
            while True:
                points, offset = self.client.scroll(name, limit=4096 if self.layout == "shared" else 1, offset=offset,
                                                    with_payload=models.PayloadSelectorInclude(include=["user_id"]))
                users.update(p.payload["user_id"] for p in points)
                if offset is None or self.layout == "per_user":
                    break
        return sorted(users)

    def known(self, user_id: str, item_ids: Iterable[str]) -> set[str]:
        """Which of these item ids the user's memory already holds."""
        return set(self.stored(user_id, item_ids))

    def stored(self, user_id: str, item_ids: Iterable[str]) -> dict[str, MemoryItem]:
        """The user's stored items among these ids, by id."""
        return {it.item_id: it for _, it in self._stored(user_id, item_ids)}

    def _stored(self, user_id: str, item_ids: Iterable[str]) -> list[tuple[int, MemoryItem]]:
        ids, name = {point_id(user_id, i) for i in item_ids}, self._name(user_id)
        if not ids or not self._exists(name):
            return []
        found = self.client.retrieve(name, list(ids), with_payload=True, with_vectors=False)
        return [(p.payload.get("seq", 0), _item(p.payload)) for p in found]

    def count(self, user_id: str | None = None) -> int:
        flt = None if user_id is None else models.Filter(
            must=[models.FieldCondition(key="user_id", match=models.MatchValue(value=user_id))])
        names = self._collections() if user_id is None else [n for n in [self._name(user_id)] if self._exists(n)]
        return sum(self.client.count(n, count_filter=flt, exact=True).count for n in names)


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
