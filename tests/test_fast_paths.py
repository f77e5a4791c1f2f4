"""The per-call shortcuts change nothing DSPy sends or returns."""

import enum
from typing import Annotated, Literal

import dspy
import pydantic
import pytest
from dspy.adapters import utils

from persona_agent.data.tasks import LAMP_2M
from persona_agent.pipelines.metering import metered
from persona_agent.runtime import overrides as fast_paths
from persona_agent.runtime.llm import SchemaJSONAdapter
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
    fast_paths.install()
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
    fast_paths.install()
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
    adapter._prepare_response_format(lm, first, sig)
    adapter._prepare_response_format(lm, second, sig.with_instructions("another persona"))
    assert first["response_format"] is second["response_format"]  # same outputs, other instructions
    fresh = {}
    SchemaJSONAdapter(max_text_chars=600, server_takes_schema=True)._prepare_response_format(lm, fresh, sig)
    assert first["response_format"].model_json_schema() == fresh["response_format"].model_json_schema()
    schema = first["response_format"].model_json_schema()
    assert schema["properties"]["profile"]["maxLength"] == 600 and schema["required"] == ["preferences", "profile"]


def test_meters_count_on_the_lm_and_callbacks_elsewhere_stay_silent(fake_lm):
    seen = []

    class Spy(dspy.utils.callback.BaseCallback):
        def on_module_start(self, call_id, instance, inputs):
            seen.append(call_id)

    predict = dspy.Predict("question -> answer")
    with metered() as cost:
        predict(question="q")
        predict(question="q2")
    assert cost.lm_calls == 2 and dspy.settings.callbacks == []
    copy = fake_lm.copy()
    with dspy.context(lm=copy), metered() as again:
        predict(question="q3")
    assert again.lm_calls == 1  # a copy of the LM keeps one counter, not two
    with dspy.context(callbacks=[Spy()]), metered() as spied:
        predict(question="q4")
    assert spied.lm_calls == 1 and seen  # a user's own global callbacks still run
