"""An OpenAI-compatible chat server on 127.0.0.1 that answers DSPy prompts after a fixed latency.

    python bench/fake_llm_server.py --port 8765 --latency 0.2

It reads the output fields DSPy asks for from the system prompt and answers in DSPy's chat
format with the scripted policy of `persona_agent.testing`, so the whole pipeline runs against
it as against a real remote LLM (`--lm openai/fake --api-base http://127.0.0.1:8765/v1`).
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from persona_agent.testing import default_policy, output_fields


def chat_format(values: dict) -> str:
    parts = [f"[[ ## {k} ## ]]\n{json.dumps(v) if not isinstance(v, str) else v}" for k, v in values.items()]
    return "\n\n".join(parts + ["[[ ## completed ## ]]"])


def make_server(port: int = 0, latency: float = 0.2, policy=default_policy) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        calls = 0

        def do_POST(self):  # noqa: N802 (http.server's naming)
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            messages = body["messages"]
            system = "\n".join(m["content"] for m in messages if m["role"] == "system")
            user = "\n".join(m["content"] for m in messages if m["role"] == "user")
            time.sleep(latency)
            content = chat_format(policy(output_fields(system), system, user))
            Handler.calls += 1
            reply = json.dumps({"id": f"fake-{Handler.calls}", "object": "chat.completion", "created": int(time.time()),
                                "model": body.get("model", "fake"),
                                "choices": [{"index": 0, "finish_reason": "stop",
                                             "message": {"role": "assistant", "content": content}}],
                                "usage": {"prompt_tokens": len(system + user) // 4, "completion_tokens": len(content) // 4,
                                          "total_tokens": (len(system + user) + len(content)) // 4}}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    server.handler = Handler
    return server


def serve_in_background(latency: float = 0.2) -> tuple[ThreadingHTTPServer, str]:
    server = make_server(0, latency)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/v1"


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, default=8765)
    ap.add_argument("--latency", type=float, default=0.2, help="seconds per call")
    a = ap.parse_args()
    print(f"serving on http://127.0.0.1:{a.port}/v1 with {a.latency * 1000:.0f} ms per call")
    make_server(a.port, a.latency).serve_forever()
