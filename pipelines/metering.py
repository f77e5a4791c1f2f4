"""LM cost accounting that is correct inside worker threads, and the counted fallbacks.

`dspy.track_usage()` records into the settings of the thread that opened it, so each unit of
work (one user's alignment iteration, one evaluation) opens its own meter where it runs.

A meter counts every LM call its block issued (`lm_calls`), and of those the ones DSPy's cache
answered (`cache_hits`, counted by the cache itself when it returns an answer: see
`runtime.lm_cache`), so a rerun reports its hits instead of zero calls, and a provider that
reports no usage is not mistaken for a cache. Each meter also counts fallbacks: calls whose
answer arrived unusable and got replaced by a default (`or_fallback`).
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import threading
from dataclasses import dataclass
from typing import Callable, TypeVar

import dspy
from dspy.utils.callback import BaseCallback
from dspy.utils.exceptions import AdapterParseError, LMError

log = logging.getLogger(__name__)


@dataclass
class Cost:
    lm_calls: int = 0  # issued, cache hits included
    tokens: int = 0
    fallbacks: int = 0
    cache_hits: int = 0

    def __iadd__(self, other: "Cost") -> "Cost":
        self.lm_calls += other.lm_calls
        self.tokens += other.tokens
        self.fallbacks += other.fallbacks
        self.cache_hits += other.cache_hits
        return self


_open_meters: contextvars.ContextVar[tuple[Cost, ...]] = contextvars.ContextVar("open_meters", default=())


_lm_errors: contextvars.ContextVar[list[BaseException] | None] = contextvars.ContextVar("lm_errors", default=None)


class _CallCounter(BaseCallback):
    """Counts each completed LM call in every meter open where it ran, and records the LM errors
    (after DSPy's retries) where `lm_errors_raised` is open."""

    def on_lm_end(self, call_id, outputs, exception=None):
        if exception is None:
            for cost in _open_meters.get():
                cost.lm_calls += 1
        elif (recorded := _lm_errors.get()) is not None and is_lm_error(exception):
            recorded.append(exception)

    def __deepcopy__(self, memo):  # `lm.copy()` deep-copies its callbacks: keep one counter
        return self


_COUNTER = _CallCounter()
_attaching = threading.Lock()


def count_calls_of(lm) -> None:
    """Count this LM's calls. The counter sits on the LM itself, not in `dspy.settings.callbacks`:
    a global callback makes DSPy run its callback machinery (argument binding, handler lookup)
    around every module, predictor and adapter call too, about ten per LM call; on the LM it
    runs once per call (`bench/nightly_throughput.py`: ~1 ms of CPU per call)."""
    if lm is None:
        return
    with _attaching:
        if _COUNTER not in (lm.callbacks or []):
            lm.callbacks = [*(lm.callbacks or []), _COUNTER]


def count_cache_hit() -> None:
    """Count one LM answer served from the cache in every meter open here."""
    for cost in _open_meters.get():
        cost.cache_hits += 1


def count_fallback() -> None:
    """Count one fallback in every meter open here (nested meters each see it)."""
    for cost in _open_meters.get():
        cost.fallbacks += 1


@contextlib.contextmanager
def metered():
    """`with metered() as cost: ...`; `cost` is filled in when the block exits. Counts the calls
    of the LM in `dspy.settings` (every program here runs on it)."""
    cost = Cost()
    count_calls_of(dspy.settings.lm)
    token = _open_meters.set((*_open_meters.get(), cost))
    with dspy.track_usage() as tracker:
        try:
            yield cost
        finally:
            _open_meters.reset(token)
            billed = [e for entries in tracker.usage_data.values() for e in entries]
            cost.tokens += sum(int(e.get("total_tokens") or 0) for e in billed)


T = TypeVar("T")


def is_lm_error(err: BaseException) -> bool:
    """The LM did not answer: DSPy's LM errors (authentication, billing, rate limit, bad request,
    model not found, timeout, server error, transport), or a provider client's own exception
    where one reaches us unmapped."""
    return isinstance(err, LMError) or type(err).__module__.split(".")[0] in ("litellm", "openai", "httpx")


@contextlib.contextmanager
def lm_errors_raised():
    """Re-raise, when the block ends, the first LM error any LM call in it ended with, even where
    the code in between swallowed it (DSPy's evaluator, inside GEPA, scores a failing program 0
    and goes on: an outage would become a search result)."""
    count_calls_of(dspy.settings.lm)
    recorded: list[BaseException] = []
    token = _lm_errors.set(recorded)
    try:
        yield
    finally:
        _lm_errors.reset(token)
    if recorded:
        raise recorded[0]


def is_unusable_answer(err: BaseException) -> bool:
    """An answer arrived and could not be read (empty, truncated, off-schema, not a label). Every
    other error is not an answer: an LM error (authentication, quota, model not found, a bad
    request, an outage after the retries) or a bug, and it must never be scored."""
    return isinstance(err, AdapterParseError)


def or_fallback(call: Callable[[], T], fallback: T, what: str) -> T:
    """`call()`, or `fallback` (logged and counted in the open meters) when the LM's answer
    arrived and cannot be used. Anything else raises: an LM that did not answer (a 401, a
    quota, a timeout after the retries, ...) is an error to report, never a wrong answer."""
    try:
        return call()
    except Exception as err:
        if not is_unusable_answer(err):
            raise
        log.warning("%s: the LM's answer could not be used, using a fallback: %s", what,
                    " ".join(str(err).split())[:200])
        count_fallback()
        return fallback


def answer_or_none(program: dspy.Module, query: str, what: str) -> str | None:
    """The program's answer, or None when the answer that arrived is unusable: one bad answer is
    a wrong answer, never a lost evaluation or alignment. An LM error raises (`or_fallback`)."""
    return or_fallback(lambda: program(query=query).answer, None, what)
