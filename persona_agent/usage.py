"""LM cost accounting that is correct inside worker threads.

`dspy.track_usage()` records into the settings of the thread that opened it, so each unit of
work (one user's alignment iteration, one evaluation) opens its own meter where it runs.
Cache hits cost nothing and are not counted.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import dspy


@dataclass
class Cost:
    lm_calls: int = 0
    tokens: int = 0

    def __iadd__(self, other: "Cost") -> "Cost":
        self.lm_calls += other.lm_calls
        self.tokens += other.tokens
        return self


@contextlib.contextmanager
def metered():
    """`with metered() as cost: ...`; `cost` is filled in when the block exits."""
    cost = Cost()
    with dspy.track_usage() as tracker:
        try:
            yield cost
        finally:
            for entries in tracker.usage_data.values():
                cost.lm_calls += len(entries)
                cost.tokens += sum(int(e.get("total_tokens") or 0) for e in entries)
