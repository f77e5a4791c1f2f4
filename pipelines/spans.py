"""Spans of the work in progress, for MLflow traces: `replay`, `critique`, `update` inside an
alignment, `answer` inside a served request.

A span is opened only inside a trace a command started (`--trace`): MLflow traces every
`start_span` by default, and alignment runs everywhere (tests, benches, the library), where a
stray trace per phase would be noise nobody asked for.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import mlflow


@contextlib.contextmanager
def span(name: str, **attributes) -> Iterator[None]:
    """A child span of the active span, if there is one; nothing otherwise."""
    if mlflow.get_current_active_span() is None:
        yield
        return
    with mlflow.start_span(name=name) as s:
        s.set_attributes({k: v for k, v in attributes.items() if v is not None})
        yield
