"""Peak memory of `nightly` as users grow (scripted LM, so the LM costs no memory or time).

    python bench/nightly_memory.py [--users 1000,10000] [--history 12]

For each size: a fresh store, `persona-agent ingest` of that many synthetic LaMP-2M users, then
`persona-agent nightly` in a process of its own, whose peak resident memory (ru_maxrss) is
read when it exits; the commit process it starts is reported apart. A store's memory and
registry grow with users; what must not is what a run holds at once.
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

from persona_agent.data.synthetic import write_dataset
from persona_agent.data.tasks import LAMP_2M

CLI = "import sys; from persona_agent.cli import main; sys.exit(main(sys.argv[1:]))"

NIGHTLY = """
import resource, sys, time
from pathlib import Path
from persona_agent.cli import main
started = time.perf_counter()
code = main(["nightly", "--store", sys.argv[1], "--lm", "scripted", "--batch", "1", "--iterations", "1",
             "--workers", "4"])
self, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
print(f"RESULT {code} {self.ru_maxrss} {children.ru_maxrss} {time.perf_counter() - started:.1f}")
"""


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--users", default="1000,10000")
    ap.add_argument("--history", type=int, default=12, help="memories per user")
    a = ap.parse_args()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "LITELLM_LOCAL_MODEL_COST_MAP": "True", "MLFLOW_DISABLE_TELEMETRY": "true"}
    rows = []
    for users in [int(n) for n in a.users.split(",")]:
        with tempfile.TemporaryDirectory() as tmp:
            store = Path(tmp) / "store"
            env["MLFLOW_TRACKING_URI"] = f"sqlite:///{store / 'mlflow.db'}"
            data = write_dataset(Path(tmp) / "data", LAMP_2M, n_users=users, n_history=a.history, n_queries=1, seed=3)
            started = time.perf_counter()
            subprocess.run([sys.executable, "-c", CLI, "ingest", str(data), "--store", str(store)],
                           check=True, env=env, stdout=subprocess.DEVNULL)
            ingest_s = time.perf_counter() - started
            out = subprocess.run([sys.executable, "-c", NIGHTLY, str(store)], env=env, capture_output=True, text=True)
            result = [line for line in out.stdout.splitlines() if line.startswith("RESULT")]
            if not result:
                sys.exit(f"nightly failed:\n{out.stderr[-2000:]}")
            code, rss, commit_rss, wall = result[-1].split()[1:]
            rows.append({"users": users, "memories": users * a.history, "exit": int(code),
                         "nightly peak RSS MB": int(rss) / 1024, "commit process peak RSS MB": int(commit_rss) / 1024,
                         "nightly s": float(wall), "ingest s": ingest_s})
            print(pd.DataFrame(rows[-1:]).to_string(index=False, float_format=lambda v: f"{v:.1f}"), flush=True)
    table = pd.DataFrame(rows)
    if len(table) > 1:
        first, last = table.iloc[0], table.iloc[-1]
        table["RSS x"] = table["nightly peak RSS MB"] / first["nightly peak RSS MB"]
        table["users x"] = table["users"] / first["users"]
        print(f"\nusers x{last['users'] / first['users']:.0f} -> peak RSS x"
              f"{last['nightly peak RSS MB'] / first['nightly peak RSS MB']:.2f}")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.1f}"))


if __name__ == "__main__":
    main()
