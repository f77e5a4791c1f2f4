"""An OpenAI-compatible chat server on 127.0.0.1 that answers DSPy prompts after a fixed latency.

    python bench/fake_llm_server.py --port 8765 --latency 0.2

It reads the output fields DSPy asks for from the system prompt and answers with the scripted
policy of `persona_agent.adapters.fakes`: in JSON when the request carries a JSON schema as its
`response_format` (as persona-agent sends to any `--api-base` server), in DSPy's chat format
otherwise, so the whole pipeline runs against
it as against a real remote LLM (`--lm openai/gpt-4o-mini --api-base http://127.0.0.1:8765/v1`).

`--faults 0.2` makes a fifth of the requests fail the ways remote LLMs do: hang past the
client's timeout, 429, 500, 503, an empty answer, or a malformed one.
"""

from __future__ import annotations

import argparse
import json
import random
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from persona_agent.adapters.fakes import default_policy, output_fields


def chat_format(values: dict) -> str:
    parts = [f"[[ ## {k} ## ]]\n{json.dumps(v) if not isinstance(v, str) else v}" for k, v in values.items()]
    return "\n\n".join(parts + ["[[ ## completed ## ]]"])


SERVER_FAULTS = ("hang", "429", "500", "503", "empty", "malformed")


class _Server(ThreadingHTTPServer):
    # A real LLM server takes many connections at once (uvicorn's listen queue is 2048). Python's
    # default of 5 dropped connections past it under 32 clients, each retried by TCP a second
    # later: the nightly bench once measured that as the pipeline's own slowness.
    request_queue_size = 1024
    daemon_threads = True


def make_server(port: int = 0, latency: float = 0.2, policy=default_policy, faults: float = 0.0, seed: int = 0,
                hang: float = 30.0, kinds=SERVER_FAULTS) -> ThreadingHTTPServer:
    """`faults`: the fraction of requests that fail (kind drawn from `kinds`, seeded); a "hang"
    sleeps `hang` seconds before answering. `server.handler.injected` counts them, and setting
    `server.handler.faults` and `.latency` change a running server (an endpoint that recovers).

    `server.handler.status = 401` (or any code) answers every request with that HTTP status and an
    OpenAI-style error body, as a provider does for a bad key (401), no credit (402), an unknown
    model (404) or a bad request (400).

    `server.handler.hold`, a callable given each request's prompt text: from the first request for
    which it returns true, every request that arrives is held (counted in `.held`) until
    `server.handler.released` is set. A test can so stop the world at a point it chooses, act, and
    only then let the calls in flight finish."""
    rng, lock = random.Random(seed), threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as real LLM servers
        disable_nagle_algorithm = True  # else a kept-alive reply waits on the client's delayed ACK
        calls = 0
        status = None
        held = 0
        hold = None
        released = threading.Event()
        injected: Counter = Counter()
        faults = 0.0
        latency = 0.0

        def do_POST(self):  # noqa: N802 (http.server's naming)
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            messages = body["messages"]
            system = "\n".join(m["content"] for m in messages if m["role"] == "system")
            user = "\n".join(m["content"] for m in messages if m["role"] == "user")
            if Handler.hold is not None and (Handler.held or Handler.hold(system + "\n" + user)):
                with lock:
                    Handler.held += 1
                Handler.released.wait()
            time.sleep(Handler.latency)
            if Handler.status is not None:
                message = {401: "Incorrect API key provided: sk-fa***ke", 402: "You exceeded your current quota",
                           404: "The model `nonexistent` does not exist"}.get(Handler.status, "Invalid request")
                return self._send(Handler.status, json.dumps({"error": {"message": message}}).encode())
            with lock:
                fault = rng.choice(kinds) if rng.random() < Handler.faults else None
                if fault:
                    Handler.injected[fault] += 1
            if fault == "hang":
                time.sleep(hang)
            if fault in ("429", "500", "503"):
                return self._send(int(fault), json.dumps({"error": {"message": f"injected {fault}"}}).encode(),
                                  {"Retry-After": "0"})
            values = policy(output_fields(system), system, user)
            # A request carrying a JSON schema gets JSON, as from a schema-following server.
            content = json.dumps(values) if body.get("response_format") else chat_format(values)
            if fault in ("empty", "malformed"):
                content = "" if fault == "empty" else content[: len(content) // 3]
            Handler.calls += 1
            reply = json.dumps({"id": f"fake-{Handler.calls}", "object": "chat.completion", "created": int(time.time()),
                                "model": body.get("model", "fake"),
                                "choices": [{"index": 0, "finish_reason": "stop",
                                             "message": {"role": "assistant", "content": content}}],
                                "usage": {"prompt_tokens": len(system + user) // 4, "completion_tokens": len(content) // 4,
                                          "total_tokens": (len(system + user) + len(content)) // 4}}).encode()
            self._send(200, reply)

        def _send(self, status: int, payload: bytes, headers: dict | None = None) -> None:
            try:
                self.send_response(status)
                for key, value in {"Content-Type": "application/json", "Content-Length": str(len(payload)),
                                   **(headers or {})}.items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(payload)
            except (BrokenPipeError, ConnectionResetError):  # the client gave up (a timeout)
                pass

        def log_message(self, *args):
            pass

    Handler.faults, Handler.latency = faults, latency
    server = _Server(("127.0.0.1", port), Handler)
    server.handler = Handler
    return server


def serve_in_background(latency: float = 0.2, **kwargs) -> tuple[ThreadingHTTPServer, str]:
    server = make_server(0, latency, **kwargs)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/v1"


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, default=8765)
    ap.add_argument("--latency", type=float, default=0.2, help="seconds per call")
    ap.add_argument("--faults", type=float, default=0.0, help="fraction of requests that fail (default 0)")
    ap.add_argument("--hang", type=float, default=30.0, help="seconds a 'hang' fault waits (default 30)")
    a = ap.parse_args()
    print(f"serving on http://127.0.0.1:{a.port}/v1 with {a.latency * 1000:.0f} ms per call, {a.faults:.0%} faults")
    make_server(a.port, a.latency, faults=a.faults, hang=a.hang).serve_forever()
