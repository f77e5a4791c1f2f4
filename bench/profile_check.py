"""How often the profile check refuses the rewrites alignment really writes.

    python bench/profile_check.py STORE [STORE ...] [--show]

STORE: an MLflow tracking URI (`sqlite:///...`) or a store folder holding `mlflow.db`, with
`persona-agent eval` runs in it. Each eval run keeps every alignment iteration
(`alignment_steps.json`: the profile before, the candidate written, its outcome); this reads the
candidates back, per task, LM and set, and prints how many were written, how many the check
refused then, and how many `profile_problem` (the check as it is now, less the copy test, which
needs the batch's requests) refuses: the data holds no attack, so every refusal here is a false
alarm. `--show` lists them. The attacks the check must
still refuse: `python bench/injection.py`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

import mlflow  # noqa: E402
import pandas as pd  # noqa: E402

from persona_agent.data.tasks import get_task  # noqa: E402
from persona_agent.pipelines.persona import profile_problem  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from injection import wilson  # noqa: E402


def candidates(uri: str) -> pd.DataFrame:
    """Every written candidate of the eval runs in one store, with the run's task, LM and data."""
    client = mlflow.MlflowClient(uri)
    frames = []
    for exp in client.search_experiments():
        for run in client.search_runs([exp.experiment_id], "tags.command = 'eval'"):
            if "alignment_steps.json" not in {a.path for a in client.list_artifacts(run.info.run_id)}:
                continue  # a run from before the table was kept, or one that stopped first
            path = Path(client.download_artifacts(run.info.run_id, "alignment_steps.json"))
            table = json.loads(path.read_text())
            steps = pd.DataFrame(table["data"], columns=table["columns"])
            steps = steps[steps.profile_after != steps.profile_before]
            p = run.data.params
            frames.append(steps.assign(task=p.get("task", ""), lm=p.get("lm", ""), data=p.get("data", "")))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("stores", nargs="+", help="MLflow tracking URIs or store folders with mlflow.db")
    ap.add_argument("--show", action="store_true", help="list every refused candidate")
    args = ap.parse_args()
    uris = [s if "://" in s else f"sqlite:///{Path(s).resolve() / 'mlflow.db'}" for s in args.stores]
    found = pd.concat([candidates(u) for u in uris], ignore_index=True)
    if found.empty:
        sys.exit("no alignment candidates in these stores (eval runs log alignment_steps.json)")
    found["refused then"] = found.outcome.str.startswith("refused")
    found["now"] = [profile_problem(text, task=get_task(task)) for text, task in zip(found.profile_after, found.task)]
    found["refused now"] = found["now"].notna()
    rows = []
    for key, group in [*found.groupby(["lm", "task"]), (("all", ""), found)]:
        k, n = int(group["refused now"].sum()), len(group)
        low, high = wilson(k, n)
        rows.append({"lm": key[0], "task": key[1], "written": n, "refused then": int(group["refused then"].sum()),
                     "refused now": k, "rate now": k / n, "95% CI": f"[{low:.3f}, {high:.3f}]"})
    print(pd.DataFrame(rows).to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    if args.show:
        for _, r in found[found["refused then"] | found["refused now"]].iterrows():
            print(f"\n{r.task} {r.user_id} iteration {r.iteration} ({r.outcome}; now: {r.now or 'passes'}):\n  "
                  f"{r.profile_after}")


if __name__ == "__main__":
    main()
