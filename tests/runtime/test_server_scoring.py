"""The evidence answer step through an OpenAI-compatible server: a server that gives top log-
probabilities and continues a trailing assistant message scores labels; one that ignores the
message must not be scored silently wrong, so a probe asks once and anything else prompts."""

import http.server
import json
import math
import threading

import dspy
import pytest

from persona_agent import overrides
from persona_agent.adapters.llm import adapter_for, build_lm
from persona_agent.data.tasks import LAMP_2M
from persona_agent.pipelines import evidence
from persona_agent.settings import LMConfig


def _logprobs(tokens: dict[str, float]) -> dict:
    top = [{"token": t, "logprob": lp} for t, lp in sorted(tokens.items(), key=lambda kv: -kv[1])]
    return {"content": [{**top[0], "top_logprobs": top}]}


def continuing(body: dict) -> dict:
    """A server like llama.cpp's: continues the last assistant message. After the probe's
    "1,2,...,7," it says "8"; after an answer's prefix, the labels the last item names."""
    last = body["messages"][-1]
    if last["role"] != "assistant":
        return {"choices": [{"message": {"role": "assistant", "content": "{\"answer\": \"comedy\"}"}}]}
    if last["content"].endswith("7,"):
        tokens = {"8": -0.01, "9": -5.0}
    else:
        item = [m["content"] for m in body["messages"] if m["role"] == "user"][-1].rsplit("description:", 1)[-1]
        lead = " " if last["content"].endswith("tag:") else ""
        tokens = {lead + label: -1.0 if label in item else -9.0 for label in LAMP_2M.labels}
    choice = {"message": {"role": "assistant", "content": max(tokens, key=tokens.get)}}
    if body.get("logprobs"):
        choice["logprobs"] = _logprobs(dict(list(tokens.items())[: body.get("top_logprobs", 1)]))
    return {"choices": [choice]}


def ignoring(body: dict) -> dict:
    """A server that answers every request afresh, whatever its last message: it gives log-
    probabilities, but of the first token of a new answer."""
    choice = {"message": {"role": "assistant", "content": "1"}, "logprobs": _logprobs({"1": -0.1, "Sure": -2.0})}
    return {"choices": [choice]}


@pytest.fixture
def server(request):
    seen = []

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self):  # noqa: N802
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append(body)
            data = json.dumps(request.param(body)).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_port}/v1", seen
    httpd.shutdown()


@pytest.mark.parametrize("server", [continuing], indirect=True)
def test_a_server_that_continues_the_prefix_scores_labels(server):
    url, seen = server
    lm = build_lm(LMConfig(model="openai/served", api_base=url, cache=False, retries=0))
    assert evidence.scoring_unsupported(lm, adapter_for(lm)) is None
    assert evidence.scoring_unsupported(lm, adapter_for(lm)) is None
    assert len(seen) == 1  # probed once
    query = LAMP_2M.make_input("A movie that is fantasy, romance, violence.", LAMP_2M.labels)
    text, prefix = LAMP_2M.reading(query)
    support = evidence.label_logprobs(lm, [{"role": "user", "content": text}], prefix, labels=LAMP_2M.labels,
                                      expand="all", missing=-math.inf, lead=" ")
    assert set(evidence.supported(support, 3.0)) == {"fantasy", "romance", "violence"}
    scoring = seen[-1]
    assert scoring["logprobs"] is True
    assert scoring["top_logprobs"] == 20
    assert scoring["max_tokens"] == 1
    assert scoring["messages"][-1] == {"role": "assistant", "content": "\ntag:"}


@pytest.mark.parametrize("server", [ignoring], indirect=True)
def test_a_server_that_ignores_the_prefix_prompts_instead(server, caplog):
    url, seen = server
    lm = build_lm(LMConfig(model="openai/served", api_base=url, cache=False, retries=0))
    why = evidence.scoring_unsupported(lm, adapter_for(lm))
    assert why == "the LM does not continue an answer's prefix"
    assert "does not continue a trailing assistant message" in overrides.engine_of(lm).probe_result
    assert "cannot score labels" in caplog.text
    with dspy.context(lm=lm, adapter=adapter_for(lm)):  # and a scoring call never asks for log-probabilities
        lm("hello")
    assert len(seen) == 2
    assert "logprobs" not in seen[-1]
