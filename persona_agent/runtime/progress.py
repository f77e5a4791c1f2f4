"""Where a command's output goes: progress on stderr, results on stdout.

Results are printed with `soft_wrap`: a line is never broken by rich, so a log (the nightly's
cron line, `eval > results.txt`) keeps each sentence and table row on one line; a terminal wraps
what does not fit, as it would for any command. Progress is a transient bar on stderr, so
`command > file` holds results only.
"""

import contextlib
import functools
import logging
import os
import sys
import threading
import time
from collections.abc import Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


def output() -> Console:
    """The console a command prints its results on (stdout)."""
    return Console(soft_wrap=True)


def progress_bar(console: Console | None = None) -> "Progress | PlainProgress":
    """A bar on a terminal; in a log (stderr redirected), plain lines at a steady pace instead:
    rich draws a bar that is not on a terminal only when it stops, so a slow LM's hour of work
    would leave the log empty until the end."""
    console = console or Console(stderr=True)
    if not console.is_terminal:
        return PlainProgress(console)
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console)


class PlainProgress:
    """The part of `rich.progress.Progress` the commands use, as log lines: one when a step is
    done (at most one per `min_gap` seconds) and, while nothing finishes, one every `every`
    seconds saying what is in hand and for how long."""

    every = 30.0
    min_gap = 5.0

    def __init__(self, console: Console):
        self.console, self.tasks, self.started = console, {}, time.monotonic()
        self._lock, self._stop, self._last = threading.Lock(), threading.Event(), 0.0
        self._beat = threading.Thread(target=self._heartbeat, daemon=True)

    def __enter__(self) -> "PlainProgress":
        self._beat.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._beat.join(timeout=1)
        self._say(force=True)

    def add_task(self, description: str, total: float | None = None, **_) -> int:
        with self._lock:
            task_id = len(self.tasks)
            self.tasks[task_id] = {"description": description, "total": total, "completed": 0}
        return task_id

    def update(self, task_id: int, *, advance: float | None = None, description: str | None = None,
               completed: float | None = None, total: float | None = None, **_) -> None:
        with self._lock:
            task = self.tasks[task_id]
            task["completed"] = completed if completed is not None else task["completed"] + (advance or 0)
            task["description"] = description or task["description"]
            task["total"] = total if total is not None else task["total"]
        self._say(force=time.monotonic() - self._last >= self.min_gap)

    def advance(self, task_id: int, advance: float = 1) -> None:
        self.update(task_id, advance=advance)

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.every / 4):
            if time.monotonic() - self._last >= self.every:
                self._say(force=True)

    def _say(self, force: bool) -> None:
        if not force:
            return
        with self._lock:
            self._last = time.monotonic()
            elapsed = time.strftime("%H:%M:%S", time.gmtime(self._last - self.started))
            for task in self.tasks.values():
                done = f"{task['completed']:g}/{task['total']:g}" if task["total"] else f"{task['completed']:g}"
                self.console.print(f"{task['description']}: {done} done, {elapsed} elapsed", soft_wrap=True,
                                   highlight=False)


@contextlib.contextmanager
def library_prints() -> Iterator[None]:
    """Around library code that prints its own progress to stdout whatever it is told (DSPy's
    evaluator inside GEPA): off stdout, which holds results; shown on stderr when DSPy logs at
    INFO (`--verbose`), dropped otherwise. Nothing of ours prints to stdout while work runs (the
    bar is on stderr; results come after). `sys.stdout` is the process's, and users run in
    threads: the first to enter swaps it, the last to leave puts it back."""
    global _inside, _saved
    with _swap:
        if _inside == 0:
            _saved = sys.stdout
            sys.stdout = sys.stderr if logging.getLogger("dspy").isEnabledFor(logging.INFO) else _sink()
        _inside += 1
    try:
        yield
    finally:
        with _swap:
            _inside -= 1
            if _inside == 0:
                sys.stdout = _saved


_swap, _inside, _saved = threading.Lock(), 0, None


@functools.cache
def _sink():
    return open(os.devnull, "w")  # noqa: SIM115 (one for the process, never closed)


_command_started: float | None = None


@contextlib.contextmanager
def command_clock() -> Iterator[None]:
    """Around a whole CLI command: the wall time it prints then includes its start-up (the
    imports of DSPy, MLflow and Qdrant, opening the store), which is what its user waited."""
    global _command_started
    _command_started = time.perf_counter()
    try:
        yield
    finally:
        _command_started = None


def wall_seconds(started: float) -> float:
    """Seconds since the command started (from the CLI), else since `started`."""
    return time.perf_counter() - min(started, _command_started if _command_started is not None else started)
