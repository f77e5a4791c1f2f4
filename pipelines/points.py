"""What episodic memory needs of the place its points live: the narrow `PointStore` protocol
(`adapters.points` has Qdrant Edge and a Qdrant server behind it), the point itself, and the
two ways a store can refuse (locked by another process, damaged on disk)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Protocol

Sparse = tuple[list[int], list[float]]


@dataclass(frozen=True)
class Point:
    id: str
    lexical: Sparse
    dense: list[float] | None
    payload: dict


class PointStore(Protocol):
    """Points of many users; every read names exactly one user (or counts them all)."""

    def upsert(self, points: list[Point]) -> None: ...

    def search(self, user_id: str, lexical: Sparse, dense: list[float] | None, limit: int,
               exclude: list[str]) -> list[tuple[float, dict]]:
        """(score, payload) of the user's best points: lexical alone, or fused with dense by RRF."""

    def payloads(self, user_id: str, ids: list[str] | None = None) -> list[dict]:
        """The user's payloads: all of them, or those among these point ids."""

    def count(self, user_id: str | None = None) -> int: ...

    def user_ids(self) -> list[str]: ...

    def delete_user(self, user_id: str) -> int:
        """Remove every point of the user; returns how many there were."""

    def close(self) -> None: ...


class StoreLocked(RuntimeError):
    """Another process has this embedded memory open."""


class StoreDamaged(RuntimeError):
    """The files of a memory store cannot be read as one: truncated, garbled or missing parts."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path, self.reason = str(path), " ".join(str(reason).split())[:300]
        super().__init__(f"the memory store {self.path} is damaged: {self.reason}")
