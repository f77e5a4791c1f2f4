"""Every place this project reaches into a private part of DSPy, MLflow or Qdrant, in one module.

The rest of the code names no private attribute of these libraries: it uses the hooks and
functions here. Each entry says why nothing public does, and `tests/test_overrides.py` fails when
the pinned library renames, removes or reshapes what it uses (pyproject.toml pins the versions).
MLflow and qdrant-client are imported inside the functions that need them, so importing this
module (every pipeline does) loads neither.
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Any

import dspy
import dspy.adapters.utils
import pydantic
from dspy.utils.exceptions import AdapterParseError

# -- DSPy: per-call work removed ------------------------------------------------------------------
# DSPy's adapters build a pydantic `TypeAdapter` for every value they format and every output they
# parse (a dozen per LM call, ~0.1-2 ms each), and a JSON schema per output type for every system
# message. Both depend only on the type, so one per type is kept. A nightly run makes thousands
# of calls under one GIL (bench/nightly_throughput.py). Nothing changes in what DSPy sends or
# returns: tests/test_overrides.py compares both ways.


@functools.lru_cache(maxsize=1024)
def _cached_adapter(annotation) -> pydantic.TypeAdapter:
    return pydantic.TypeAdapter(annotation)


def type_adapter(annotation, *args, **kwargs) -> pydantic.TypeAdapter:
    """`pydantic.TypeAdapter(annotation)`, built once per (hashable) annotation."""
    if args or kwargs:
        return pydantic.TypeAdapter(annotation, *args, **kwargs)
    try:
        return _cached_adapter(annotation)
    except TypeError:  # unhashable (e.g. a type with unhashable metadata): build it each time
        return pydantic.TypeAdapter(annotation)


_dspy_json_schema = dspy.adapters.utils._get_json_schema


@functools.lru_cache(maxsize=1024)
def _cached_schema(field_type) -> dict:
    return _dspy_json_schema(field_type)


def json_schema(field_type) -> dict:
    """DSPy's JSON schema of an output type: built once per type (a copy each time, so no caller
    can change the cached one)."""
    try:
        return copy.deepcopy(_cached_schema(field_type))
    except TypeError:
        return _dspy_json_schema(field_type)


def install_fast_paths() -> None:
    """Idempotent. DSPy's adapter helpers name both as module globals of `dspy.adapters.utils`."""
    dspy.adapters.utils.TypeAdapter = type_adapter
    dspy.adapters.utils._get_json_schema = json_schema


# -- DSPy: ReAct ----------------------------------------------------------------------------------


@functools.lru_cache(maxsize=64)
def _trajectory_signature(keys: tuple[str, ...]) -> type[dspy.Signature]:
    return dspy.Signature(f"{', '.join(keys)} -> x")


class ReAct(dspy.ReAct):
    """`dspy.ReAct` with a public hook on what its extraction step is given.

    DSPy passes the inputs of each step through `_call_with_potential_trajectory_truncation` and
    formats the trajectory in `_format_trajectory`, both private and with no public alternative."""

    def extraction_inputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """The inputs of the final extraction call; override to change them."""
        return inputs

    def _call_with_potential_trajectory_truncation(self, module, trajectory, **input_args):
        if module is self.extract:
            input_args = self.extraction_inputs(input_args)
        return super()._call_with_potential_trajectory_truncation(module, trajectory, **input_args)

    def _format_trajectory(self, trajectory: dict) -> str:
        # DSPy builds a signature per step just to format the trajectory; here one per shape.
        adapter = dspy.settings.adapter or dspy.ChatAdapter()
        return adapter.format_user_message_content(_trajectory_signature(tuple(trajectory)), trajectory)


# -- DSPy: adapters -------------------------------------------------------------------------------


class AdapterHooks:
    """Mixin placed before a DSPy adapter class in the bases: public hooks for three private steps.

    - `on_unusable_answer()`: an answer arrived and could not be parsed (DSPy's
      `_call_postprocess` raises `AdapterParseError`); called before the error goes on.
    - `response_format(lm, lm_kwargs, signature)`: what JSONAdapter's `_prepare_response_format`
      puts in `lm_kwargs["response_format"]`; DSPy's own by default.
    - `json_fallback()`: the adapter ChatAdapter's `_make_json_adapter_fallback` falls back to.
    """

    def on_unusable_answer(self) -> None:
        pass

    def response_format(self, lm, lm_kwargs, signature) -> None:
        return super()._prepare_response_format(lm, lm_kwargs, signature)

    def json_fallback(self):
        return super()._make_json_adapter_fallback()

    def _call_postprocess(self, *args, **kwargs):
        try:
            return super()._call_postprocess(*args, **kwargs)
        except AdapterParseError:
            self.on_unusable_answer()
            raise

    def _prepare_response_format(self, lm, lm_kwargs, signature):
        return self.response_format(lm, lm_kwargs, signature)

    def _make_json_adapter_fallback(self):
        return self.json_fallback()


# -- DSPy: the LM and its cache -------------------------------------------------------------------


def engine_of(lm: dspy.LM):
    """The engine object an LM was built with (`dspy.LM(..., engine=...)`), or None; DSPy keeps
    it as `_engine_spec` and offers no accessor."""
    return getattr(lm, "_engine_spec", None)


def forget_cached(cache, keys: list[str]) -> None:
    """Delete answers from DSPy's cache (`dspy.clients.cache.Cache`), from memory and disk. DSPy
    has no delete: its lock and both stores are attributes of the cache object."""
    with cache._lock:
        for key in keys:
            cache.memory_cache.pop(key, None)
    if cache.enable_disk_cache:
        for key in keys:
            cache.disk_cache.delete(key)


def put_cached_tagged(cache, key: str, value, tag: str, memory: bool = True) -> None:
    """DSPy's `Cache.put` for a key already computed, with a tag on the disk entry (diskcache
    takes one; DSPy's put passes none), so `evict_cached_tag` can later delete exactly these."""
    if cache.enable_memory_cache and memory:
        with cache._lock:
            cache.memory_cache[key] = value
    if cache.enable_disk_cache:
        cache.disk_cache.set(key, value, tag=tag)


def evict_cached_tag(cache, tag: str) -> tuple[int, list[str]]:
    """Delete every disk entry with `tag` from DSPy's cache and clear its memory; returns how
    many, and the SQLite files of the disk cache's shards (to compact: deleted rows keep bytes)."""
    if not cache.enable_disk_cache:
        return 0, []
    disk = cache.disk_cache
    gone = disk.evict(tag)
    cache.reset_memory_cache()
    return gone, [str(Path(shard.directory) / "cache.db") for shard in getattr(disk, "_shards", [disk])]


# -- tqdm: bars made and dropped on several threads ----------------------------------------------


def tolerate_tqdm_thread_races() -> None:
    """tqdm keeps its live bars in a class-level WeakSet and removes a bar from it on two paths; with
    bars made on many threads at once (DSPy's evaluators inside GEPA), a removal can find the bar
    gone and raise `KeyError: <weakref ...>`, which ended an `eval` with exit 2. A bar that is
    already gone is what removing it wants."""
    import tqdm.std

    bars = tqdm.std.tqdm._instances
    if getattr(bars, "tolerant", False):
        return

    class TolerantBars(type(bars)):
        tolerant = True

        def remove(self, item):
            try:
                super().remove(item)
            except KeyError:
                pass

    tolerant = TolerantBars()
    tolerant.update(bars)
    tqdm.std.tqdm._instances = tolerant


# -- MLflow: the prompt registry ------------------------------------------------------------------


def registry_client(client):
    """The registry client behind an `MlflowClient`: its `create_prompt_version` adds a version
    without copying every version tag onto the prompt (one database write each, most of a
    nightly commit's CPU), and its `set_prompt_alias` skips the client's re-read of the version."""
    return client._get_registry_client()


def forget_cached_alias(client, name: str, alias: str) -> None:
    """Drop MLflow's in-process cache entry for `prompts:/name@alias` after moving the alias
    through the registry client (MlflowClient.set_prompt_alias does this itself)."""
    from mlflow.prompt.registry_utils import PromptCache

    PromptCache.get_instance().delete(name, alias=alias, registry_uri=client._registry_uri)


# -- Qdrant ---------------------------------------------------------------------------------------


def purge_run(tracking_uri: str, run_id: str) -> None:
    """Delete a deleted run for good, with its artifacts, on a local (SQLAlchemy) tracking store:
    what `mlflow gc` does, for one run; MLflow has no public call for it."""
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository
    from mlflow.tracking._tracking_service.utils import _get_store

    store = _get_store(tracking_uri)
    run = store.get_run(run_id)
    try:
        get_artifact_repository(run.info.artifact_uri).delete_artifacts()
    except Exception:  # none were logged
        pass
    store._hard_delete_run(run_id)


def is_embedded_qdrant(client) -> bool:
    """qdrant-client's in-process engine (`QdrantClient(path=...)` or `":memory:"`), which has no
    payload indexes; a client does not say which backend it wraps."""
    return type(client._client).__name__ == "QdrantLocal"
