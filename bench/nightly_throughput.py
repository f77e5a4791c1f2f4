"""Nightly throughput against a fake remote LLM with fixed latency.

    python bench/nightly_throughput.py [--users 64] [--latency 0.2] [--workers 1,4,16]

For each worker count: a fresh store with the same synthetic users, `nightly` over all of them,
users/minute, and efficiency = actual / ideal, where ideal = workers / (LM calls per user x
latency): the rate if the LLM's latency were the only cost.
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

import socket  # noqa: E402
import subprocess  # noqa: E402

import pandas as pd  # noqa: E402

from persona_agent.adapters.points import open_memory
from persona_agent.data.synthetic import write_dataset  # noqa: E402
from persona_agent.data.tasks import LAMP_2M  # noqa: E402
from persona_agent.nightly.driver import run_nightly  # noqa: E402
from persona_agent.pipelines.ingest import ingest  # noqa: E402
from persona_agent.settings import LMConfig, Settings  # noqa: E402


def _wait_for(port: int, seconds: float = 30) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("the fake LLM server did not start")


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--users", type=int, default=64)
    ap.add_argument("--latency", type=float, default=0.2)
    ap.add_argument("--workers", default="1,4,16")
    ap.add_argument("--executor", default="thread", choices=["thread", "ray"])
    ap.add_argument("--model", default="openai/gpt-4o-mini", help="the name sent to the fake server")
    a = ap.parse_args()
    # The fake LLM runs in its own process, as a remote server would: in this process it would
    # compete with the system under test for the GIL.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen([sys.executable, str(Path(__file__).parent / "fake_llm_server.py"), "--port", str(port),
                               "--latency", str(a.latency)], stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/v1"
    _wait_for(port)
    rows = []
    if a.executor == "ray":  # start Ray before the clock: a nightly job runs on a cluster that is up
        import ray

        ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
    with tempfile.TemporaryDirectory() as tmp:
        data = write_dataset(Path(tmp) / "data", LAMP_2M, n_users=a.users, n_history=12, n_queries=1, seed=5)
        for workers in [int(w) for w in a.workers.split(",")]:
            store = Path(tmp) / f"store{workers}"
            os.environ.pop("MLFLOW_TRACKING_URI", None)
            # A model name in DSPy's price table: for a name it does not know, DSPy scans the whole
            # table on every call (~3 ms of CPU) to estimate a cost it then cannot give.
            settings = Settings(store=store, lm=LMConfig(a.model, api_base=url, cache=False),
                                batch_size=3, iterations=2, max_iters=1)
            store.mkdir(parents=True)
            memory = open_memory(path=str(settings.qdrant_path))
            ingest(memory, data, LAMP_2M)
            memory.close()
            started, cpu, server_cpu = time.perf_counter(), os.times(), _cpu_seconds(server.pid)
            summary = run_nightly(replace(settings, workers=workers), LAMP_2M, executor=a.executor)
            seconds, spent = time.perf_counter() - started, os.times()
            users = len(summary.aligned) + len(summary.rejected)
            calls_per_user = summary.lm_calls / max(users, 1)
            ideal = workers / (calls_per_user * a.latency) * 60
            rows.append({"workers": workers, "users": users, "failed": len(summary.failed), "LM calls/user": calls_per_user,
                         "seconds": seconds, "users/min": users / seconds * 60, "ideal users/min": ideal,
                         "efficiency": users / seconds * 60 / ideal,
                         # where the 2 cores went: this process (planning, workers) per LM call,
                         # its children (the commit process; Ray's actors) per user, the fake LLM per call
                         "cpu ms/call": (spent.user + spent.system - cpu.user - cpu.system) / summary.lm_calls * 1000,
                         "commit cpu ms/user": (spent.children_user + spent.children_system - cpu.children_user
                                                - cpu.children_system) / users * 1000,
                         "LLM cpu ms/call": (_cpu_seconds(server.pid) - server_cpu) / summary.lm_calls * 1000})
    server.terminate()
    print(f"{a.users} users, {a.latency * 1000:.0f} ms per LM call, {a.executor} executor")
    print(pd.DataFrame(rows).to_string(index=False, float_format=lambda v: f"{v:.2f}"))


if __name__ == "__main__":
    main()
