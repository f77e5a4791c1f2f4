"""How a nightly run is told to stop: signals, and the budget gate every LM call of the workers
passes first. A stopped or deferred user raises out of the call it was about to make and is not
committed (never half aligned); the users that finished are."""

from __future__ import annotations

import contextlib
import contextvars
import signal
import threading

import dspy
from dspy.utils.callback import BaseCallback
from rich.console import Console

from persona_agent.nightly.jobs import NightlySummary


class Stopped(BaseException):
    """Raised in a worker at its next LM call once the run was told to stop. A BaseException, so
    no `except Exception` on the way (DSPy's own, or a counted fallback) takes it for a bad answer."""


class Deferred(Stopped):
    """Raised in a worker at an LM call past a budget: the user is not committed (never half
    aligned), keeps their persona, and is aligned on a later night."""


# LM calls the user a worker thread is aligning has made (a one-item list, set per job)
user_calls: contextvars.ContextVar[list[int] | None] = contextvars.ContextVar("user_calls", default=None)


class Gate(BaseCallback):
    """First callback on every LM call of the workers: refuses it once the run was told to stop,
    or when it would pass a budget (`max_calls_per_user`, `max_calls` per night; 0: none).
    Calls DSPy's cache answers count too: whether one will is known only after it is made."""

    def __init__(self, stop: threading.Event, per_user: int, per_night: int):
        self.stop, self.per_user, self.per_night = stop, per_user, per_night
        self.calls, self.spent, self._lock = 0, threading.Event(), threading.Lock()

    def on_lm_start(self, call_id, instance, inputs):
        if self.stop.is_set():
            raise Stopped
        with self._lock:
            if self.per_night and self.calls >= self.per_night:
                self.spent.set()
                raise Deferred(f"the night's budget of {self.per_night} LM calls was spent")
            self.calls += 1
        user = user_calls.get()
        if user is not None:
            if self.per_user and user[0] >= self.per_user:
                raise Deferred(f"needs more than the {self.per_user} LM calls a user may use per night")
            user[0] += 1  # counted once allowed: the calls this user made, deferred or not


@contextlib.contextmanager
def first_callback_of(lm: dspy.LM, callback: BaseCallback):
    """The LM's own first callback for the run (before the meters' counter, so a refused call is
    not counted): on the LM, DSPy runs callbacks once per LM call; in `dspy.settings` it would
    run them around every module and adapter call as well."""
    lm.callbacks = [callback, *(lm.callbacks or [])]
    try:
        yield
    finally:
        lm.callbacks = [c for c in lm.callbacks if c is not callback]


@contextlib.contextmanager
def stop_on_signals(stop: threading.Event, summary: NightlySummary, console: Console):
    """The first SIGINT/SIGTERM asks the run to stop; a second SIGINT aborts at once (the store
    stays consistent either way: see `jobs`). Only the main thread can take signals."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handle(signum, frame):
        summary.stopped_by = signal.Signals(signum).name
        stop.set()
        signal.signal(signal.SIGINT, signal.default_int_handler)
        console.print(f"{summary.stopped_by}: stopping; committing the users that finished "
                      "(Ctrl-C again to abort at once)")

    previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
