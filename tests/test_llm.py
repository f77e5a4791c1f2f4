import json

import dspy

from persona_agent.llm import CompletionAdapter, SchemaJSONAdapter, compact_json_grammar


class Answer(dspy.Signature):
    """Tag it."""

    query: str = dspy.InputField()
    memories: str = dspy.InputField()
    answer: str = dspy.OutputField()


def test_completion_prompt_puts_context_before_the_demos_and_ends_on_the_pattern():
    demos = [dspy.Example(query="q1", answer="a1"), dspy.Example(query="q2", answer="a2")]
    (msg,) = CompletionAdapter().format(Answer, demos, {"query": "q3", "memories": "m"})
    text = msg["content"]
    assert text.startswith("Tag it.")
    assert text.index("memories: m") < text.index("query: q1") < text.index("query: q2") < text.index("query: q3")
    assert 'query: q2\nOutput: {"answer": "a2"}' in text and text.endswith("query: q3\nOutput:")


def test_completion_prompt_without_demos_shows_every_input():
    (msg,) = CompletionAdapter().format(Answer, [], {"query": "q", "memories": "m"})
    assert msg["content"] == "Tag it.\n\nquery: q\nmemories: m\n\nOutput:"


def test_schema_requires_every_field_and_bounds_free_text():
    class Step(dspy.Signature):
        """s"""

        q: str = dspy.InputField()
        thought: str = dspy.OutputField()
        args: dict = dspy.OutputField()

    class LM:
        supported_params = {"response_format"}

    kwargs = {}
    SchemaJSONAdapter(max_text_chars=50)._prepare_response_format(LM(), kwargs, Step)
    schema = kwargs["response_format"].model_json_schema()
    assert schema["required"] == ["thought", "args"] and schema["additionalProperties"] is False
    assert schema["properties"]["thought"]["maxLength"] == 50
    assert schema["properties"]["args"]["additionalProperties"]["type"] == "string"


def test_grammar_is_compact_json_of_the_schema():
    g = compact_json_grammar({"type": "object", "properties": {"a": {"type": "string"}}})
    head, schema = g.split("start: %json ")
    schema = json.loads(schema)
    assert schema["additionalProperties"] is False and schema["x-guidance"]["whitespace_flexible"] is False
