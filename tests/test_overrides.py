"""`persona_agent.overrides`, the one module that reaches into private parts of DSPy, MLflow and
Qdrant: each test here fails when the pinned library renames, removes or reshapes what it uses,
and the per-call shortcuts change nothing DSPy sends or returns."""

import enum
from typing import Annotated, Literal

import dspy
import pydantic
import pytest
from dspy.adapters import utils

from persona_agent import overrides as fast_paths
from persona_agent.adapters.llm import SchemaJSONAdapter
from persona_agent.data.tasks import LAMP_2M
from persona_agent.overrides import engine_of
from persona_agent.pipelines.metering import metered
from persona_agent.signatures import SummarizeProfile, typed_profile


class Color(enum.Enum):
    RED = "red"


class Point(pydantic.BaseModel):
    x: int
    tags: list[str] = []


VALUES = ["text", "", 3, 2.5, float("inf"), True, None, ["a", 1], {"k": [1, {"n": None}]}, (1, "b"), Color.RED,
          Point(x=1, tags=["t"]), {"set"}, b"bytes"]


def _run_both(fn, monkeypatch):
    monkeypatch.setattr(utils, "TypeAdapter", pydantic.TypeAdapter)
    theirs = [fn(v) for v in VALUES]
    fast_paths.install_fast_paths()
    return theirs, [fn(v) for v in VALUES]


def test_values_are_formatted_as_dspy_formats_them(monkeypatch):
    theirs, ours = _run_both(utils.serialize_for_json, monkeypatch)
    assert repr(ours) == repr(theirs)


@pytest.mark.parametrize("annotation, raw", [
    (Literal["comedy", "sci-fi"], "comedy"), (Literal[1, 2, 3], "2"), (int, "7"), (float, "2.5"), (list[str], '["a", "b"]'),
    (dict[str, int], '{"a": 1}'), (bool, "true"), (str | None, "x"), (Point, '{"x": 3}'), (Color, "RED"),
    (list[Literal["a", "b"]], '["a"]')])
def test_outputs_are_parsed_as_dspy_parses_them(monkeypatch, annotation, raw):
    theirs, ours = _run_both(lambda _: utils.parse_value(raw, annotation), monkeypatch)
    assert ours == theirs


def test_an_invalid_output_fails_the_same_way(monkeypatch):
    fast_paths.install_fast_paths()
    with pytest.raises(pydantic.ValidationError):
        utils.parse_value("not a number", int)


def test_one_type_adapter_per_type():
    assert fast_paths.type_adapter(list[str]) is fast_paths.type_adapter(list[str])
    unhashable = Annotated[int, {"note": "a dict"}]
    assert fast_paths.type_adapter(unhashable).validate_python("3") == 3  # built each time, not cached


def test_the_schema_sent_is_built_once_per_output_shape_and_equals_a_fresh_one():
    sig = typed_profile(SummarizeProfile, LAMP_2M, ["comedy", "sci-fi"])
    adapter, lm = SchemaJSONAdapter(max_text_chars=600, server_takes_schema=True), dspy.LM("openai/x")
    first, second = {}, {}
    adapter.response_format(lm, first, sig)
    adapter.response_format(lm, second, sig.with_instructions("another persona"))
    assert first["response_format"] is second["response_format"]  # same outputs, other instructions
    fresh = {}
    SchemaJSONAdapter(max_text_chars=600, server_takes_schema=True).response_format(lm, fresh, sig)
    assert first["response_format"].model_json_schema() == fresh["response_format"].model_json_schema()
    schema = first["response_format"].model_json_schema()
    assert schema["properties"]["profile"]["maxLength"] == 600
    assert schema["required"] == ["preferences", "profile"]


def test_meters_count_on_the_lm_and_callbacks_elsewhere_stay_silent(fake_lm):
    seen = []

    class Spy(dspy.utils.callback.BaseCallback):
        def on_module_start(self, call_id, instance, inputs):
            seen.append(call_id)

    predict = dspy.Predict("question -> answer")
    with metered() as cost:
        predict(question="q")
        predict(question="q2")
    assert cost.lm_calls == 2
    assert dspy.settings.callbacks == []
    copy = fake_lm.copy()
    with dspy.context(lm=copy), metered() as again:
        predict(question="q3")
    assert again.lm_calls == 1  # a copy of the LM keeps one counter, not two
    with dspy.context(callbacks=[Spy()]), metered() as spied:
        predict(question="q4")
    assert spied.lm_calls == 1
    assert seen  # a user's own global callbacks still run


# -- each private name the overrides use: fail loudly when the library changes it --------------


def test_react_formats_trajectories_and_extracts_through_the_overridden_private_steps(memory, fake_lm, monkeypatch):
    import inspect

    from persona_agent.pipelines.agent import PersonaAgent
    from persona_agent.pipelines.memory import UserMemory
    from persona_agent.pipelines.persona import Persona

    assert list(inspect.signature(dspy.ReAct._format_trajectory).parameters) == ["self", "trajectory"]
    assert list(inspect.signature(dspy.ReAct._call_with_potential_trajectory_truncation).parameters) == [
        "self", "module", "trajectory", "input_args"]
    formatted, extracted = [], []
    original = fast_paths.ReAct._format_trajectory
    monkeypatch.setattr(fast_paths.ReAct, "_format_trajectory",
                        lambda self, trajectory: formatted.append(dict(trajectory)) or original(self, trajectory))
    from persona_agent.pipelines import agent as agent_module

    hook = agent_module._ReAct.extraction_inputs
    monkeypatch.setattr(agent_module._ReAct, "extraction_inputs",
                        lambda self, inputs: extracted.append(inputs) or hook(self, inputs))
    engine_of(fake_lm).policy = lambda fields, s, u: (
        {"answer": "action"} if fields == ["answer"] else
        {"next_thought": "t", "next_tool_name": "finish", "next_tool_args": {}})
    agent = PersonaAgent(Persona(LAMP_2M, "Loves heists."), UserMemory(memory, "alice", k=5), max_iters=2)
    agent(query=LAMP_2M.make_input("A heist.", LAMP_2M.labels))
    # once before the first step, once for the extraction after it: if DSPy stops calling the
    # method, the override silently does nothing and every step builds a signature again
    assert len(formatted) == 2
    assert "tool_name_0" in formatted[1]
    assert len(extracted) == 1
    assert "query" in extracted[0]  # the hook saw the extraction's inputs, once


class _Hooked(fast_paths.AdapterHooks, dspy.JSONAdapter):
    def __init__(self):
        super().__init__()
        self.unusable, self.formats = 0, 0

    def on_unusable_answer(self):
        self.unusable += 1

    def response_format(self, lm, lm_kwargs, signature):
        self.formats += 1
        return super().response_format(lm, lm_kwargs, signature)


def test_adapter_hooks_see_dspys_parse_failures_and_response_format_steps():
    from dspy.utils.exceptions import AdapterParseError

    from persona_agent.adapters.fakes import FakeEngine

    engine = FakeEngine()
    lm = dspy.LM("fake/hooks", engine=engine, cache=False, num_retries=0)
    adapter = _Hooked()
    engine.policy = lambda fields, s, u: {"answer": "fine"}
    with dspy.context(lm=lm, adapter=adapter):
        assert dspy.Predict("question -> answer")(question="q").answer == "fine"
        assert adapter.formats >= 1
        assert adapter.unusable == 0
        engine.policy = lambda fields, s, u: {"no such field": 1}  # arrives, cannot be parsed
        with pytest.raises(AdapterParseError):
            dspy.Predict("question -> answer")(question="q")
    assert adapter.unusable == 1


def test_chat_adapter_falls_back_through_the_json_fallback_hook():
    from persona_agent.adapters.fakes import FakeEngine

    class Chat(fast_paths.AdapterHooks, dspy.ChatAdapter):
        fallbacks = []

        def json_fallback(self):
            fallback = super().json_fallback()
            Chat.fallbacks.append(fallback)
            return fallback

    engine = FakeEngine()  # answers JSON, which DSPy's chat format cannot parse: it falls back
    engine.policy = lambda fields, s, u: {"answer": "fine"}
    lm = dspy.LM("fake/chat", engine=engine, cache=False, num_retries=0)
    with dspy.context(lm=lm, adapter=Chat()):
        assert dspy.Predict("question -> answer")(question="q").answer == "fine"
    assert len(Chat.fallbacks) == 1
    assert isinstance(Chat.fallbacks[0], dspy.JSONAdapter)


def test_engine_of_returns_the_engine_an_lm_was_built_with():
    from persona_agent.adapters.fakes import FakeEngine

    engine = FakeEngine()
    assert fast_paths.engine_of(dspy.LM("fake/x", engine=engine)) is engine
    assert fast_paths.engine_of(dspy.LM("openai/gpt-4o-mini")) is None or not hasattr(
        fast_paths.engine_of(dspy.LM("openai/gpt-4o-mini")), "complete")


def test_forget_cached_deletes_from_dspys_memory_and_disk_cache(tmp_path):
    from dspy.clients.cache import Cache

    cache = Cache(enable_disk_cache=True, enable_memory_cache=True, disk_cache_dir=str(tmp_path))
    request = {"model": "x", "messages": [{"role": "user", "content": "hi"}]}
    cache.put(request, {"answer": 1})
    key = cache.cache_key(request)
    assert cache.get(request) is not None
    assert key in cache.disk_cache
    fast_paths.forget_cached(cache, [key])
    assert cache.get(request) is None
    assert key not in cache.disk_cache


def test_the_registry_client_moves_an_alias_and_the_prompt_cache_forgets_it(mlflow_store):
    import mlflow

    client = mlflow.MlflowClient(mlflow_store.tracking_uri)
    client.register_prompt(name="probe", template="one")
    registry = fast_paths.registry_client(client)
    assert registry.create_prompt_version("probe", "two").version == 2
    client.set_prompt_alias("probe", "production", 1)
    assert mlflow.genai.load_prompt("prompts:/probe@production").template == "one"  # now cached
    registry.set_prompt_alias("probe", "production", 2)
    fast_paths.forget_cached_alias(client, "probe", "production")
    assert mlflow.genai.load_prompt("prompts:/probe@production").template == "two"


def test_is_embedded_qdrant_tells_the_in_process_engine_from_a_server_client():
    from qdrant_client import QdrantClient

    assert fast_paths.is_embedded_qdrant(QdrantClient(location=":memory:"))
    assert not fast_paths.is_embedded_qdrant(QdrantClient(url="http://127.0.0.1:1"))  # no connection is made


def test_a_tqdm_bar_removed_twice_is_no_error():
    """tqdm's live-bar set raised KeyError when two threads dropped bars at once (an `eval` with
    GEPA ended with exit 2, `<weakref ... to 'tqdm'>`): removing a bar already gone is a no-op."""
    import tqdm.std

    fast_paths.tolerate_tqdm_thread_races()
    fast_paths.tolerate_tqdm_thread_races()  # once
    bar = tqdm.std.tqdm(total=1, disable=True)
    tqdm.std.tqdm._instances.remove(bar)  # already removed by `disable`: raised KeyError before
    assert type(tqdm.std.tqdm._instances).__name__ == "TolerantBars"


def test_a_tagged_cache_entry_is_evicted_by_its_tag_alone(tmp_path):
    from dspy.clients.cache import Cache

    cache = Cache(enable_disk_cache=True, enable_memory_cache=True, disk_cache_dir=str(tmp_path))
    fast_paths.put_cached_tagged(cache, "k1", "mine", "user-a")
    fast_paths.put_cached_tagged(cache, "k2", "theirs", "user-b")
    gone, shards = fast_paths.evict_cached_tag(cache, "user-a")
    assert gone == 1
    assert shards
    assert cache.disk_cache.get("k1") is None
    assert cache.disk_cache.get("k2") == "theirs"


def test_purge_run_deletes_a_run_and_its_artifacts_for_good(mlflow_store):
    import mlflow

    with mlflow.start_run() as run:
        mlflow.log_text("secret", "a.txt")
    client = mlflow.MlflowClient()
    client.delete_run(run.info.run_id)
    fast_paths.purge_run(mlflow_store.tracking_uri, run.info.run_id)
    with pytest.raises(mlflow.exceptions.MlflowException):
        client.get_run(run.info.run_id)
    assert not list(mlflow_store.artifacts_path.rglob("a.txt"))
