"""Spans of the work in progress, for traces: `replay`, `critique`, `update` inside an
alignment, `answer` inside a served request.

The method names its phases and knows no tracing library: a command that traces installs an
opener (`adapters.tracking.enable_traces` installs MLflow's, which opens a span only inside a
trace the command started: alignment runs everywhere, in tests, benches and the library, where a
stray trace per phase would be noise nobody asked for). With none installed a span is nothing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Callable, ContextManager

Opener = Callable[[str, dict], ContextManager[None]]
_opener: Opener | None = None


def install(opener: Opener | None) -> None:
    """Open spans with `opener(name, attributes)` from now on (None: open none)."""
    global _opener
    _opener = opener


@contextlib.contextmanager
def span(name: str, **attributes) -> Iterator[None]:
    """A span named `name` with `attributes` (those not None), where an opener is installed."""
    if _opener is None:
        yield
        return
    with _opener(name, {k: v for k, v in attributes.items() if v is not None}):
        yield
