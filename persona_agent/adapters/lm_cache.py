"""DSPy's response cache, made safe to rerun against a flaky endpoint.

DSPy stores an LLM answer before its adapter parses it, and leaves the endpoint (`api_base`) out
of the key. So an empty or truncated HTTP-200 answer would be replayed on every rerun, even once
the endpoint is healthy again, and two servers behind one model name would share answers. Here:

- `install()` wraps `dspy.cache` so the key also carries the endpoint (the API key stays out);
- adapters with `ForgetsUnusableAnswers` delete the answer they could not use (empty, truncated,
  off-schema), whether it just arrived or came from the cache (an older run's).

An adapter call formats, calls the LM and parses in one thread, one after the other, so the
answers read or written between its start and its parse are the ones it failed to use.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import logging
import sqlite3

import dspy

from persona_agent.overrides import AdapterHooks, evict_cached_tag, forget_cached, put_cached_tagged
from persona_agent.pipelines.metering import count_cache_hit

log = logging.getLogger(__name__)

# Cache keys of the answers the current prediction (in this thread) read or wrote.
_touched: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar("lm_cache_touched", default=None)
# Whose work the LM calls in this context do: their answers are tagged with it on disk, so that
# `forget` can evict exactly them (the cache keeps answers, not requests, so nothing else would tell).
_owner: contextvars.ContextVar[str | None] = contextvars.ContextVar("lm_cache_owner", default=None)


def owner_tag(user_id: str) -> str:
    """The tag a user's cached answers carry: a hash, so the cache holds no user id."""
    return "user-" + hashlib.sha256(user_id.encode()).hexdigest()[:32]


@contextlib.contextmanager
def owned_by(user_id: str):
    """The LM answers cached inside are the user's (one user's alignment, eval or answer)."""
    token = _owner.set(owner_tag(user_id))
    try:
        yield
    finally:
        _owner.reset(token)


def evict(user_id: str) -> int:
    """Delete the user's cached answers from DSPy's disk cache and from its memory, and compact
    the cache's databases so the deleted answers leave no bytes behind; returns how many."""
    cache = dspy.cache.inner if isinstance(dspy.cache, EndpointCache) else dspy.cache
    gone, shards = evict_cached_tag(cache, owner_tag(user_id))
    for path in shards if gone else ():
        with contextlib.closing(sqlite3.connect(path, timeout=60)) as db:
            db.execute("VACUUM")
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # diskcache writes ahead: the log held them too
    return gone


class EndpointCache:
    """Delegates to DSPy's cache, keying by endpoint and remembering which keys a call touched."""

    def __init__(self, inner):
        self.inner = inner
        self.forgotten = 0  # unusable answers deleted, for logs and tests

    @staticmethod
    def _ignored(ignored: list[str] | None) -> list[str]:
        return [k for k in ignored or () if k not in ("api_base", "base_url")]

    def _touch(self, request: dict, ignored: list[str]) -> None:
        touched = _touched.get()
        if touched is not None:
            touched.append(self.inner.cache_key(request, ignored))

    def get(self, request: dict, ignored_args_for_cache_key: list[str] | None = None):
        ignored = self._ignored(ignored_args_for_cache_key)
        value = self.inner.get(request, ignored)
        if value is not None:
            self._touch(request, ignored)
            count_cache_hit()  # a hit, counted where it happens: not guessed from missing usage
        return value

    def put(self, request: dict, value, ignored_args_for_cache_key: list[str] | None = None,
            enable_memory_cache: bool = True) -> None:
        ignored = self._ignored(ignored_args_for_cache_key)
        owner = _owner.get()
        if owner is None or not getattr(self.inner, "enable_disk_cache", False):
            self.inner.put(request, value, ignored, enable_memory_cache)
        else:  # DSPy's own put, with the owner's tag on the disk entry (DSPy's takes no tag)
            try:
                put_cached_tagged(self.inner, self.inner.cache_key(request, ignored), value, owner, enable_memory_cache)
            except Exception as err:  # as DSPy: a cache that cannot write is no failed LM call
                log.debug("could not cache an LM answer: %s", err)
        self._touch(request, ignored)

    def forget(self, keys: list[str]) -> None:
        forget_cached(self.inner, keys)
        self.forgotten += len(keys)

    def __getattr__(self, name):  # reset_memory_cache, cache_key, ...: DSPy's own
        return getattr(self.inner, name)


def install() -> EndpointCache:
    """Wrap `dspy.cache` once per process (DSPy reads it as a module attribute on every call)."""
    if not isinstance(dspy.cache, EndpointCache):
        dspy.cache = EndpointCache(dspy.cache)
    return dspy.cache


class ForgetsUnusableAnswers(AdapterHooks):
    """Mixin for DSPy adapters (before the adapter class in the bases)."""

    def __call__(self, *args, **kwargs):
        token = _touched.set([])
        try:
            return super().__call__(*args, **kwargs)
        finally:
            _touched.reset(token)

    def on_unusable_answer(self) -> None:
        touched, cache = _touched.get(), dspy.cache
        if touched and isinstance(cache, EndpointCache):
            cache.forget(touched)
            log.info("dropped %d unusable LLM answer(s) from the cache", len(touched))
            touched.clear()
