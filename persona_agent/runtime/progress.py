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
import time
import threading
from collections.abc import Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


def output() -> Console:
    """The console a command prints its results on (stdout)."""
    return Console(soft_wrap=True)


def progress_bar(console: Console | None = None) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console or Console(stderr=True))


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
