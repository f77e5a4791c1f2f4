"""Serve the shipped Gemma 3 270M over llama.cpp's OpenAI-compatible HTTP API (xllamacpp).

    python bench/llama_server.py [--port 8089] [--model PATH.gguf]

Then, in another shell:

    OPENAI_API_KEY=unused persona-agent demo --lm openai/gemma3-270m --api-base http://127.0.0.1:8089/v1

Listens on 127.0.0.1 only. Same weights, threads and sampling defaults as the in-process engine,
so the two paths can be compared call for call (`tests/test_served_llm.py` does).
"""

import argparse
import os
import signal
import threading

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def serve(port: int, model: str | None = None, threads: int = 2, n_ctx: int = 16384, n_parallel: int = 4):
    import xllamacpp

    from persona_agent.adapters.llm import default_model_path

    params = xllamacpp.CommonParams()
    params.model.path = model or default_model_path()
    params.n_ctx, params.n_parallel = n_ctx, n_parallel
    params.cpuparams.n_threads = params.cpuparams_batch.n_threads = threads
    params.swa_full = True  # as in process: long shared prefixes stay cached
    params.warmup = False
    params.verbosity = -1
    params.hostnames = ["127.0.0.1"]
    params.port = port
    return xllamacpp.Server(params)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, default=8089)
    p.add_argument("--model", help="a GGUF file (default: the shipped Gemma 3 270M)")
    args = p.parse_args()
    server = serve(args.port, args.model)  # noqa: F841 (serves while referenced)
    print(f"listening on http://127.0.0.1:{args.port}/v1", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()


if __name__ == "__main__":
    main()
