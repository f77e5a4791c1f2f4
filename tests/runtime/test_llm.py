import contextlib
import http.server
import json
import threading

import dspy
import pytest

from persona_agent.adapters.llm import CompletionAdapter, SchemaJSONAdapter, adapter_for, build_lm, compact_json_grammar
from persona_agent.settings import LMConfig


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
    assert 'query: q2\nOutput: {"answer": "a2"}' in text
    assert text.endswith("query: q3\nOutput:")


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
    assert schema["required"] == ["thought", "args"]
    assert schema["additionalProperties"] is False
    assert schema["properties"]["thought"]["maxLength"] == 50
    assert schema["properties"]["args"]["additionalProperties"]["type"] == "string"


def test_grammar_is_compact_json_of_the_schema():
    g = compact_json_grammar({"type": "object", "properties": {"a": {"type": "string"}}})
    head, schema = g.split("start: %json ")
    schema = json.loads(schema)
    assert schema["additionalProperties"] is False
    assert schema["x-guidance"]["whitespace_flexible"] is False


# -- the OpenAI-compatible engine ------------------------------------------------------------------


@contextlib.contextmanager
def _server(replies: list[tuple[int, dict | str]]):
    """A chat-completions endpoint answering `replies` in turn (the last one repeats); records
    each request body and how many connections were opened."""
    seen = {"bodies": [], "connections": 0}

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as real servers

        def setup(self):
            super().setup()
            seen["connections"] += 1

        def do_POST(self):  # noqa: N802
            seen["bodies"].append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            status, reply = replies[min(len(seen["bodies"]), len(replies)) - 1]
            data = (reply if isinstance(reply, str) else json.dumps(reply)).encode()
            self.send_response(status)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/v1", seen
    finally:
        server.shutdown()


def _completion(text: str) -> dict:
    return {"id": "x", "choices": [{"message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 5, "completion_tokens": 2}}


def _ask(url_or_lm, retries: int = 2):
    lm = url_or_lm if isinstance(url_or_lm, dspy.LM) else build_lm(
        LMConfig("openai/some-org/some-model", api_base=url_or_lm, cache=False, retries=retries))
    with dspy.context(lm=lm, adapter=adapter_for(lm)):
        return dspy.Predict("question -> answer")(question="q").answer


def test_the_served_engine_sends_the_schema_and_the_model_and_keeps_its_connection():
    with _server([(200, _completion('{"answer": "yes"}'))]) as (url, seen):
        lm = build_lm(LMConfig("openai/some-org/some-model", api_base=url, cache=False))
        assert _ask(lm) == "yes"
        assert _ask(lm) == "yes"
    body = seen["bodies"][0]
    assert body["model"] == "some-org/some-model"
    assert body["max_tokens"] == 384
    assert body["response_format"]["type"] == "json_schema"
    assert body["response_format"]["json_schema"]["schema"]["required"] == ["answer"]
    assert seen["connections"] == 1  # one thread, one kept-alive connection for both calls


@pytest.mark.parametrize("status, retried", [(429, True), (503, True), (500, True), (400, False), (404, False)])
def test_the_served_engine_retries_what_is_transient_only(status, retried, monkeypatch):
    monkeypatch.setattr("time.sleep", lambda s: None)  # DSPy's backoff
    with _server([(status, {"error": "no"}), (200, _completion('{"answer": "yes"}'))]) as (url, seen):
        if retried:
            assert _ask(url) == "yes"
            assert len(seen["bodies"]) == 2
        else:
            with pytest.raises(Exception) as err:
                _ask(url)
            assert str(status) in str(err.value)
            assert len(seen["bodies"]) == 1


def test_a_reply_that_is_no_completion_is_a_server_error_not_a_crash(monkeypatch):
    monkeypatch.setattr("time.sleep", lambda s: None)
    with _server([(200, "<html>proxy error</html>")]) as (url, seen):
        with pytest.raises(Exception, match="not a chat completion"):
            _ask(url, retries=1)
    assert len(seen["bodies"]) == 2  # retried once: a gateway's garbage is transient


def test_an_api_base_that_is_no_url_is_refused():
    with pytest.raises(ValueError, match="http"):
        build_lm(LMConfig("openai/x", api_base="localhost:8000"))
