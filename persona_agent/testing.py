"""A small deterministic LM engine for tests and benchmarks.

It reads which output fields DSPy asks for and answers with a JSON object built by a policy
function, so tests script behaviour ("answer what the persona says") instead of a fixed queue
of strings.
"""

import json
import re
import time

from dspy.lm15 import Message, Response, TextPart, Usage


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
        else:
            out[f] = "comedy" if f == "answer" else f"a {f}"
    return out


class FakeEngine:
    """`delay` seconds per call stand in for a remote LLM's latency."""

    def __init__(self, policy=default_policy, delay: float = 0.0):
        self.policy, self.delay = policy, delay
        self.calls = []  # (fields, system, user) per call

    def complete(self, request):
        if self.delay:
            time.sleep(self.delay)
        system = request.system if isinstance(request.system, str) else "".join(p.text for p in request.system or ())
        user = "\n".join(m.text or "" for m in request.messages if m.role == "user")
        fields = output_fields(system)
        self.calls.append((fields, system, user))
        text = json.dumps(self.policy(fields, system, user))
        return Response(id=None, model=request.model, message=Message.assistant([TextPart(text)]),
                        finish_reason="stop", usage=Usage(input_tokens=len(system + user) // 4, output_tokens=len(text) // 4))

    def stream(self, request):
        from dspy.lm15 import response_to_events

        return response_to_events(self.complete(request))

    def close(self):
        pass
