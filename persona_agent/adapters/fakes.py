"""Small deterministic LM engines for tests and benchmarks.

`FakeEngine` reads which output fields DSPy asks for and answers with a JSON object built by a
policy function, so tests script behaviour ("answer what the persona says") instead of a fixed
queue of strings. `FaultyEngine` wraps an engine and injects the faults a remote LLM has.
"""

import json
import random
import re
import threading
import time
from collections import Counter

from dspy.lm15 import Message, RateLimitError, Response, ServerError, TextPart, TokenLogprob, TopLogprob, Usage
from dspy.lm15 import TimeoutError as LMTimeoutError

# Transient faults (DSPy retries them) and answers that arrive but are useless (the adapter
# cannot parse them: the call fails once DSPy's fallback parse fails too).
FAULTS = ("timeout", "rate_limit", "server_error", "empty", "malformed")


def output_fields(system: str) -> list[str]:
    block = system.split("Your output fields are:", 1)[1].split("All interactions", 1)[0]
    return re.findall(r"^\d+\. `(\w+)`", block, flags=re.M)


def default_policy(fields, system, user):
    out = {}
    for f in fields:
        if f == "next_thought":
            out[f] = "I have what I need."
        elif f == "next_tool_name":
            out[f] = "finish"
        elif f == "next_tool_args":
            out[f] = {}
        elif f == "preferences":  # the typed profile part: the first value its type allows
            out[f] = allowed_preference(system)
        else:
            out[f] = "comedy" if f == "answer" else f"a {f}"
    return out


def allowed_preference(system: str):
    """A value of the `preferences` field as DSPy's prompt types it: a list of the first allowed
    label (comedy where allowed), or one tendency string for a rating task."""
    m = re.search(r"`preferences` \((list\[)?Literal\[(.*?)\]", system)
    allowed = re.findall(r"'([^']*)'", m.group(2)) if m else ["comedy"]
    value = "comedy" if "comedy" in allowed else "as the review reads" if "as the review reads" in allowed else allowed[0]
    return [value] if (m is None or m.group(1)) else value


class _Engine:
    """DSPy's engine contract beyond `complete`: streaming replays the whole response."""

    def stream(self, request):
        from dspy.lm15 import response_to_events

        return response_to_events(self.complete(request))

    def close(self):
        pass


class FakeEngine(_Engine):
    """`delay` seconds per call stand in for a remote LLM's latency."""

    def __init__(self, policy=default_policy, delay: float = 0.0):
        self.policy, self.delay = policy, delay
        self.calls = []  # (fields, system, user) per call
        self.configs = []  # the request's `Config` per call (temperature, ...)

    def complete(self, request):
        if self.delay:
            time.sleep(self.delay)
        system, user = _prompt(request)
        fields = output_fields(system)
        self.calls.append((fields, system, user))
        self.configs.append(request.config)
        text = json.dumps(self.policy(fields, system, user))
        return Response(id=None, model=request.model, message=Message.assistant([TextPart(text)]),
                        finish_reason="stop", usage=Usage(input_tokens=len(system + user) // 4, output_tokens=len(text) // 4))


class ScoringFakeEngine(FakeEngine):
    """A FakeEngine that also scores: a request with `logprobs` whose last message is the
    assistant's continues that prefix by one token, and `scores(prompt, prefix)` gives the
    alternatives there ({token: log-probability}): what the answer step of `pipelines.evidence`
    reads. Every other request is answered as FakeEngine answers it."""

    supported_params = frozenset({"response_format", "temperature", "max_tokens", "logprobs"})
    continues_prefill = True

    def __init__(self, scores, policy=default_policy, delay: float = 0.0):
        super().__init__(policy, delay)
        self.scores, self.scored = scores, []  # (prompt, prefix) per scoring call

    def complete(self, request):
        last = request.messages[-1] if request.messages else None
        if request.config.logprobs is None or last is None or last.role != "assistant":
            return super().complete(request)
        system, user = _prompt(request)
        prompt, prefix = system + "\n" + user, last.text or ""
        self.scored.append((prompt, prefix))
        alternatives = sorted(self.scores(prompt, prefix).items(), key=lambda kv: -kv[1])
        top = tuple(TopLogprob(tok, float(lp)) for tok, lp in alternatives[:request.config.logprobs])
        token = top[0] if top else TopLogprob("", 0.0)
        return Response(id=None, model=request.model, message=Message.assistant([TextPart(token.token)]),
                        finish_reason="stop", usage=Usage(input_tokens=len(prompt) // 4, output_tokens=1),
                        logprobs=(TokenLogprob(token.token, token.logprob, top=top),))


class FaultyEngine(_Engine):
    """Wraps an engine: each call fails with probability `rate`, with a kind drawn from `kinds`
    (seeded, so a run's fault counts are reproducible). A call whose prompt contains `poison`
    always fails with a server error: a user whose alignment cannot succeed however often it
    is retried (`poison` may also be a predicate on the prompt text). `injected` counts what was injected, by kind.

    Transient faults carry `retry_after=0`, so DSPy's retries happen at once in tests."""

    def __init__(self, inner=None, rate: float = 0.2, kinds=FAULTS, *, seed: int = 0, poison: str | None = None):
        unknown = set(kinds) - set(FAULTS)
        if unknown:
            raise ValueError(f"unknown fault kinds {sorted(unknown)}; known: {FAULTS}")
        self.inner, self.rate, self.kinds, self.poison = inner or FakeEngine(), rate, tuple(kinds), poison
        self._rng, self._lock = random.Random(seed), threading.Lock()
        self.injected: Counter = Counter()

    def complete(self, request):
        text = "\n".join(_prompt(request))
        with self._lock:
            kind = self._rng.choice(self.kinds) if self._rng.random() < self.rate else None
            if self.poison and (self.poison(text) if callable(self.poison) else self.poison in text):
                kind = "server_error"
            if kind:
                self.injected[kind] += 1
        if kind == "timeout":
            raise LMTimeoutError("injected: request timed out", status=408, retry_after=0)
        if kind == "rate_limit":
            raise RateLimitError("injected: too many requests", status=429, retry_after=0)
        if kind == "server_error":
            raise ServerError("injected: internal server error", status=500, retry_after=0)
        response = self.inner.complete(request)
        if kind in ("empty", "malformed"):
            # cut inside the first key: no signature's fields can be read from it (a cut after
            # `"answer": "comedy"` would still be a whole answer to an answer-only call)
            garbage = "" if kind == "empty" else '{"ans'
            return Response(id=response.id, model=response.model, message=Message.assistant([TextPart(garbage)]),
                            finish_reason="stop", usage=response.usage)
        return response


def _prompt(request) -> tuple[str, str]:
    """The system prompt and the user messages of a DSPy request, as text."""
    system = request.system if isinstance(request.system, str) else "".join(p.text for p in request.system or ())
    return system, "\n".join(m.text or "" for m in request.messages if m.role == "user")
