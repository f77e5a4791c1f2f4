"""Per-call work DSPy repeats that a nightly run of thousands of LM calls feels, removed without
changing what DSPy sends or returns (`tests/test_fast_paths.py` compares both).

DSPy's adapters build a pydantic `TypeAdapter` for every value they format and every output
they parse (a dozen per LM call, ~0.1-2 ms each: pydantic generates a schema each time). A
TypeAdapter depends only on its type and is safe to share between threads, so one per type is
kept here. Measured with `bench/nightly_throughput.py`: at 32 workers every call's CPU is
spent under one GIL, so each millisecond saved per call is worth ~3% of the night's rate.
"""

from __future__ import annotations

import copy
import functools

import dspy.adapters.utils
import pydantic


@functools.lru_cache(maxsize=1024)
def _cached(annotation) -> pydantic.TypeAdapter:
    return pydantic.TypeAdapter(annotation)


def type_adapter(annotation, *args, **kwargs) -> pydantic.TypeAdapter:
    """`pydantic.TypeAdapter(annotation)`, built once per (hashable) annotation."""
    if args or kwargs:
        return pydantic.TypeAdapter(annotation, *args, **kwargs)
    try:
        return _cached(annotation)
    except TypeError:  # unhashable (e.g. a type with unhashable metadata): build it each time
        return pydantic.TypeAdapter(annotation)


_dspy_json_schema = dspy.adapters.utils._get_json_schema


@functools.lru_cache(maxsize=1024)
def _json_schema_cached(field_type) -> dict:
    return _dspy_json_schema(field_type)


def json_schema(field_type) -> dict:
    """DSPy's JSON schema of an output type, as written into every system message: built once
    per type (a copy each time, so no caller can change the cached one)."""
    try:
        return copy.deepcopy(_json_schema_cached(field_type))
    except TypeError:
        return _dspy_json_schema(field_type)


def install() -> None:
    """Idempotent. DSPy's adapter helpers name both as module globals."""
    dspy.adapters.utils.TypeAdapter = type_adapter
    dspy.adapters.utils._get_json_schema = json_schema
