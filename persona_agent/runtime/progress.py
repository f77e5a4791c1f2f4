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


def progress_bar(console: Console | None = None, *, every: float = 30.0) -> "Progress | PlainProgress":
    """A bar on a terminal; in a log (stderr redirected), plain lines at a steady pace instead
    (at least one per `every` seconds): rich draws a bar that is not on a terminal only when it
    stops, so a slow LM's hour of work would leave the log empty until the end."""
    console = console or Console(file=sys.stderr)  # this stderr, kept while library code is quieted
    if not console.is_terminal:
        return PlainProgress(console, every=every)
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console)


class PlainProgress:
    """The part of `rich.progress.Progress` the commands use, as log lines: one when a step is
    done (at most one per `min_gap` seconds) and, while nothing finishes, one every `every`
    seconds saying what is in hand and for how long; each says done / total, the time elapsed
    and, once a step is done, an estimate of the time left (at the pace so far)."""

    min_gap = 5.0

    def __init__(self, console: Console, every: float = 30.0):
        self.min_gap = min(self.min_gap, every)
        self.console, self.tasks, self.started, self.every = console, {}, time.monotonic(), every
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
            spent = self._last - self.started
            for task in self.tasks.values():
                done, total = task["completed"], task["total"]
                left = f", about {_clock(spent / done * (total - done))} left" if total and 0 < done < total else ""
                counted = f"{done:g}/{total:g}" if total else f"{done:g}"
                self.console.print(f"{task['description']}: {counted} done, {_clock(spent)} elapsed{left}",
                                   soft_wrap=True, highlight=False, markup=False)


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes // 60:02d}:{minutes % 60:02d}:{secs:02d}"


@contextlib.contextmanager
def library_prints() -> Iterator[None]:
    """Around library code that prints its own progress whatever it is told (DSPy's evaluator and
    GEPA's bar inside GEPA, `mlflow.genai.evaluate`'s bar and summary): off stdout, which holds
    results, and off stderr, where in a log they would be bar fragments; both shown on stderr
    when DSPy logs at INFO (`--verbose`). Our own progress keeps the stderr it was made with
    (`progress_bar`), and log handlers hold theirs, so neither goes quiet. `sys.stdout` and
    `sys.stderr` are the process's, and users run in threads: the first to enter swaps them,
    the last to leave puts them back."""
    global _inside, _saved
    with _swap:
        if _inside == 0:
            _saved = sys.stdout, sys.stderr
            shown = logging.getLogger("dspy").isEnabledFor(logging.INFO)
            sys.stdout, sys.stderr = (sys.stderr, sys.stderr) if shown else (_sink(), _sink())
        _inside += 1
    try:
        yield
    finally:
        with _swap:
            _inside -= 1
            if _inside == 0:
                sys.stdout, sys.stderr = _saved


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
