"""Where episodic memory's points live: Qdrant Edge in this process (the embedded default) or a
Qdrant server. `EpisodicMemory` speaks only the narrow `PointStore` protocol (`pipelines.points`), so the
per-user logic (vectors, payloads, ordering) is written once and every read is filtered here.

Edge is Qdrant's own engine run in process: segments, an inverted index for the sparse lexical
vectors and a keyword index on `user_id`, so one user with 100,000 memories is searched in about
a millisecond (`bench/retrieval_latency.py`). qdrant-client's embedded mode, used before, scans
every point in Python (183 ms at 10,000); `ClientPoints` still runs on it for reading old stores.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import qdrant_edge as edge
from qdrant_client import QdrantClient, models

from persona_agent.overrides import is_embedded_qdrant
from persona_agent.pipelines.memory import Embedder, EpisodicMemory
from persona_agent.pipelines.points import Point, StoreDamaged, StoreLocked

log = logging.getLogger(__name__)
_ALL = 2**31 - 1


def scratch_dir() -> str | None:
    """A RAM-backed directory for throwaway shards where there is one (Linux), else the default."""
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None


@contextlib.contextmanager
def _damage_named(root: Path) -> Iterator[None]:
    """Qdrant Edge raises a bare `Exception` for what it reads wrong (a truncated page, a garbled
    WAL or config, a missing index), at open or at the first read that touches it: that is the
    store's damage, said once with its path. Any other exception type is ours and passes."""
    try:
        yield
    except Exception as err:
        if type(err) is not Exception:
            raise
        if "WouldBlock" in str(err):  # Edge locks its write-ahead log: one process at a time
            raise StoreLocked(f"{root} is open in another process") from None
        # What the system refused is no damage: restoring a backup over it would throw away
        # everything since, where making the folder writable or freeing space loses nothing.
        code = _OS_ERROR.search(str(err))
        code = int(code.group(1)) if code else None
        if code in (errno.EPERM, errno.EACCES, errno.EROFS):
            raise OSError(code, f"the memory store is not writable ({os.strerror(code)}); nothing in it is damaged: "
                                "make it writable (its permissions, a read-only mount, chattr -i) and run it again",
                          str(root)) from None
        if code in (errno.ENOSPC, errno.EDQUOT):
            raise OSError(code, f"the disk is full ({os.strerror(code)}); nothing in the memory store is damaged: "
                                "free some space and run it again", str(root)) from None
        raise StoreDamaged(root, str(err).removeprefix("Service runtime error: ")) from None


_OS_ERROR = re.compile(r"\(os error (\d+)\)")


class EdgePoints:
    """A Qdrant Edge shard at `path`, or in a temporary directory removed on close."""

    def __init__(self, path: str | os.PathLike | None = None, dense_size: int | None = None):
        """path None: a throwaway shard (one job's or one test's), in RAM where the system has a
        RAM disk, with no write-ahead log: Edge holds the GIL while it creates, syncs and closes a
        shard, ~27 ms on disk against ~5 ms in RAM, once per nightly user."""
        self._tmp = tempfile.mkdtemp(prefix="persona-agent-memory-", dir=scratch_dir()) if path is None else None
        root = Path(self._tmp or path)
        config = edge.EdgeConfig(
            vectors={"dense": edge.EdgeVectorParams(size=dense_size, distance=edge.Distance.Cosine)} if dense_size else {},
            sparse_vectors={"lexical": edge.EdgeSparseVectorParams(modifier=edge.Modifier.Idf)},
            wal_enabled=self._tmp is None)
        self.root, self._config, self._dense_size = root, config, dense_size
        if self._tmp is None:
            _finish_swap(root)
        if root.exists() and not root.is_dir():
            raise StoreDamaged(root, "a file where the memory's folder should be")
        with _damage_named(root):
            if (root / "edge_config.json").exists():
                if not (root / "segments").is_dir():  # Edge would open it as an empty store
                    raise StoreDamaged(root, "its segments folder is missing")
                self.shard = edge.EdgeShard.load(str(root), config)
            else:
                self.shard = edge.EdgeShard.create(str(root), config)
                self.shard.update(edge.UpdateOperation.create_field_index("user_id", edge.PayloadSchemaType.Keyword))

    @staticmethod
    def _user(user_id: str, exclude: list[str] = ()) -> edge.Filter:
        return edge.Filter(must=[edge.FieldCondition("user_id", match=edge.MatchValue(user_id))],
                           must_not=[edge.HasIdCondition(set(exclude))] if exclude else None)

    def upsert(self, points: list[Point]) -> None:
        def vectors(p: Point) -> dict:
            out = {"lexical": edge.SparseVector(*p.lexical)}
            return out | {"dense": p.dense} if p.dense is not None else out

        with _damage_named(self.root):
            self.shard.update(edge.UpdateOperation.upsert_points([edge.Point(p.id, vectors(p), p.payload) for p in points]))

    def search(self, user_id, lexical, dense, limit, exclude):
        flt = self._user(user_id, exclude)
        lexical_query = edge.Query.Nearest(edge.SparseVector(*lexical), using="lexical")
        if dense is None:
            request = edge.QueryRequest(limit=limit, query=lexical_query, filter=flt, with_payload=True)
        else:
            request = edge.QueryRequest(
                limit=limit, with_payload=True, filter=flt, query=edge.Fusion.Rrf(k=2),
                prefetches=[edge.Prefetch(limit=2 * limit, query=lexical_query, filter=flt),
                            edge.Prefetch(limit=2 * limit, query=edge.Query.Nearest(dense, using="dense"), filter=flt)])
        with _damage_named(self.root):
            return [(h.score, h.payload) for h in self.shard.query(request)]

    def payloads(self, user_id, ids=None):
        with _damage_named(self.root):
            if ids is not None:
                found = self.shard.retrieve(list(ids), with_payload=True, with_vector=False)
                return [r.payload for r in found if r.payload.get("user_id") == user_id]
            out, offset = [], None
            while True:
                records, offset = self.shard.scroll(edge.ScrollRequest(offset=offset, limit=1024,
                                                                       filter=self._user(user_id), with_payload=True))
                out.extend(r.payload for r in records)
                if offset is None:
                    return out

    def count(self, user_id=None):
        with _damage_named(self.root):
            return self.shard.count(edge.CountRequest(exact=True, filter=None if user_id is None else self._user(user_id)))

    def user_ids(self):
        with _damage_named(self.root):
            return sorted(hit.value for hit in self.shard.facet(edge.FacetRequest("user_id", limit=_ALL, exact=True)).hits)

    def delete_user(self, user_id: str) -> int:
        """Remove the user's points, and every byte of them: Edge only marks a deleted point and
        keeps its pages (and the write-ahead log its upsert) until it optimises, so the shard is
        rebuilt from the other users' points beside it and swapped in. Returns the points removed."""
        gone = self.count(user_id)
        if not gone:
            return 0
        partial = self.root.with_name(self.root.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        target, offset = None, None
        others = edge.Filter(must_not=[edge.FieldCondition("user_id", match=edge.MatchValue(user_id))])
        with _damage_named(self.root):
            while True:
                records, offset = self.shard.scroll(edge.ScrollRequest(offset=offset, limit=1024, filter=others,
                                                                       with_payload=True, with_vector=True))
                points = [Point(str(r.id), (r.vector["lexical"].indices, r.vector["lexical"].values),
                                r.vector.get("dense"), r.payload) for r in records]
                if target is None:
                    dense = next((len(p.dense) for p in points if p.dense is not None), None)
                    target = EdgePoints(partial, dense_size=dense if dense is not None else self._dense_size)
                if points:
                    target.upsert(points)
                if offset is None:
                    break
        target.shard.flush()
        target.close()
        self.shard.close()
        _swap(partial, self.root)
        self.shard = edge.EdgeShard.load(str(self.root), self._config)
        return gone

    def close(self) -> None:
        self.shard.close()
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)


def _swap(new: Path, root: Path) -> None:
    """Put the shard at `new` in the place of `root`, crash-safely: a marker says the swap is
    under way, and whoever opens `root` next finishes it (`_finish_swap`)."""
    marker = root.with_name(root.name + ".swap")
    marker.touch()
    _fsync_dir(root.parent)
    _finish_swap(root)


def _finish_swap(root: Path) -> None:
    marker, new, old = (root.with_name(root.name + suffix) for suffix in (".swap", ".partial", ".replaced"))
    if not marker.exists():
        return
    if new.exists():
        if root.exists():
            os.replace(root, old)
        os.replace(new, root)
        _fsync_dir(root.parent)
    shutil.rmtree(old, ignore_errors=True)
    marker.unlink(missing_ok=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ClientPoints:
    """One collection through qdrant-client: a Qdrant server, where `user_id` is the tenant key."""

    def __init__(self, client: QdrantClient, collection: str = "episodic", dense_size: int | None = None,
                 owns_client: bool = False):
        """owns_client: close the client with this store (else its opener closes it)."""
        self.client, self.collection, self.dense_size, self.owns_client = client, collection, dense_size, owns_client
        self._ready = False

    @staticmethod
    def _user(user_id: str, exclude: list[str] = ()) -> models.Filter:
        return models.Filter(
            must=[models.FieldCondition(key="user_id", match=models.MatchValue(value=user_id))],
            must_not=[models.HasIdCondition(has_id=list(exclude))] if exclude else None)

    def _exists(self) -> bool:
        self._ready = self._ready or self.client.collection_exists(self.collection)
        return self._ready

    def _ensure(self) -> None:
        if self._exists():
            return
        dense = {"dense": models.VectorParams(size=self.dense_size, distance=models.Distance.COSINE)} if self.dense_size else {}
        self.client.create_collection(
            self.collection, vectors_config=dense,
            sparse_vectors_config={"lexical": models.SparseVectorParams(modifier=models.Modifier.IDF)})
        if not is_embedded_qdrant(self.client):  # qdrant-client's in-process engine has no payload indexes
            self.client.create_payload_index(
                self.collection, "user_id",
                field_schema=models.KeywordIndexParams(type=models.KeywordIndexType.KEYWORD, is_tenant=True))
        self._ready = True

    def upsert(self, points: list[Point]) -> None:
        self._ensure()
        self.client.upsert(self.collection, wait=True, points=[
            models.PointStruct(id=p.id, payload=p.payload, vector={
                "lexical": models.SparseVector(indices=p.lexical[0], values=p.lexical[1]),
                **({"dense": p.dense} if p.dense is not None else {})}) for p in points])

    def search(self, user_id, lexical, dense, limit, exclude):
        if not self._exists():
            return []
        flt, sparse = self._user(user_id, exclude), models.SparseVector(indices=lexical[0], values=lexical[1])
        if dense is None:
            hits = self.client.query_points(self.collection, query=sparse, using="lexical", query_filter=flt,
                                            limit=limit, with_payload=True).points
        else:
            hits = self.client.query_points(
                self.collection, query=models.FusionQuery(fusion=models.Fusion.RRF), query_filter=flt, limit=limit,
                with_payload=True,
                prefetch=[models.Prefetch(query=sparse, using="lexical", filter=flt, limit=2 * limit),
                          models.Prefetch(query=dense, using="dense", filter=flt, limit=2 * limit)]).points
        return [(h.score, h.payload) for h in hits]

    def payloads(self, user_id, ids=None):
        if not self._exists():
            return []
        if ids is not None:
            found = self.client.retrieve(self.collection, list(ids), with_payload=True, with_vectors=False)
            return [p.payload for p in found if p.payload.get("user_id") == user_id]
        return [p.payload for p in self._scroll(self._user(user_id))]

    def _scroll(self, flt: models.Filter | None, with_vectors: bool = False) -> Iterator[models.Record]:
        offset = None
        while True:
            points, offset = self.client.scroll(self.collection, scroll_filter=flt, limit=1024, offset=offset,
                                                with_payload=True, with_vectors=with_vectors)
            yield from points
            if offset is None:
                return

    def count(self, user_id=None):
        if not self._exists():
            return 0
        flt = None if user_id is None else self._user(user_id)
        return self.client.count(self.collection, count_filter=flt, exact=True).count

    def user_ids(self):
        if not self._exists():
            return []
        return sorted({p.payload["user_id"] for p in self._scroll(None)})

    def delete_user(self, user_id: str) -> int:
        """Remove the user's points (the server reclaims their space as it optimises)."""
        gone = self.count(user_id)
        if gone:
            self.client.delete(self.collection, points_selector=models.FilterSelector(filter=self._user(user_id)), wait=True)
        return gone

    def close(self) -> None:
        if self.owns_client:
            self.client.close()


def open_memory(path: str | None = None, url: str | None = None, embedder: Embedder | None = None,
                *, collection: str = "episodic") -> EpisodicMemory:
    """Episodic memory on Qdrant Edge at `path` (":memory:" or None: a throwaway shard), or on a
    server at `url`."""
    size = len(embedder(["probe"])[0]) if embedder is not None else None
    if url:
        return EpisodicMemory(ClientPoints(QdrantClient(url=url), collection, dense_size=size, owns_client=True), embedder)
    return EpisodicMemory(EdgePoints(None if path in (None, ":memory:") else path, dense_size=size), embedder)
