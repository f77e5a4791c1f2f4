"""A nightly run against a faulty remote LLM: what was injected, what the run made of it.

    python bench/fault_rehearsal.py [--users 16] [--faults 0.2] [--workers 8]

The fake server (`fake_llm_server.py`, in this process) fails a fraction of requests: hangs past
the client's 1 s timeout, 429, 500, 503, empty and truncated answers. Prints the faults by kind,
the run's summary, and checks every user ends with a persona that parses.
"""

import argparse
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("OPENAI_API_KEY", "fake-key-for-the-local-fake-server")
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
sys.path.insert(0, str(Path(__file__).parent))

import mlflow  # noqa: E402
import pandas as pd  # noqa: E402
from fake_llm_server import serve_in_background  # noqa: E402

from persona_agent.adapters.points import open_memory
from persona_agent.adapters.registry import PersonaRegistry  # noqa: E402
from persona_agent.data.synthetic import write_dataset  # noqa: E402
from persona_agent.data.tasks import LAMP_2M  # noqa: E402
from persona_agent.nightly.driver import print_summary, run_nightly  # noqa: E402
from persona_agent.pipelines.ingest import ingest  # noqa: E402
from persona_agent.settings import LMConfig, Settings  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--users", type=int, default=16)
    ap.add_argument("--faults", type=float, default=0.2)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--retries", type=int, default=3)
    a = ap.parse_args()
    server, url = serve_in_background(latency=0.05, faults=a.faults, seed=1, hang=3.0)
    with tempfile.TemporaryDirectory() as tmp:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
        data = write_dataset(Path(tmp) / "data", LAMP_2M, n_users=a.users, n_history=12, n_queries=1, seed=5)
        settings = Settings(store=Path(tmp) / "store", lm=LMConfig("openai/gpt-4o-mini", api_base=url, cache=False,
                                                                 retries=a.retries, timeout=1.0),
                            batch_size=3, iterations=2, max_iters=1)
        settings.store.mkdir()
        memory = open_memory(path=str(settings.qdrant_path))
        ingest(memory, data, LAMP_2M)
        memory.close()
        started = time.perf_counter()
        summary = run_nightly(replace(settings, workers=a.workers), LAMP_2M)
        seconds = time.perf_counter() - started
        mlflow.set_tracking_uri(settings.tracking_uri)
        registry = PersonaRegistry(LAMP_2M)
        parsed = sum(registry.production_version(u) is not None for u in registry.users()["user_id"])
    server.shutdown()
    injected = server.handler.injected
    print(f"{a.users} users, {a.faults:.0%} of requests faulty, {a.retries} retries, {seconds:.1f} s")
    print(pd.Series(injected, name="injected").sort_index().to_string())
    print(f"requests answered: {server.handler.calls}, faults injected: {sum(injected.values())}")
    print_summary(summary)
    print(f"users with a production persona that parses: {parsed}/{a.users}")


if __name__ == "__main__":
    main()
