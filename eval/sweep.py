"""`persona-agent sweep`: the paper's test-time scaling and cold-start studies.

One setting varies (alignment batch n, iterations T, retrieved memories K, or the history kept
per user for cold start) while the rest stay fixed; each point is a full evaluation of the
chosen methods with run-scoped memory of its own. Writes `sweep_<param>.csv` and a PNG plot, both also
logged to an MLflow run.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402
import mlflow  # noqa: E402
import pandas as pd  # noqa: E402

from persona_agent.adapters import tracking  # noqa: E402
from persona_agent.adapters.llm import adapter_for, build_lm  # noqa: E402
from persona_agent.data.loaders import UserData  # noqa: E402
from persona_agent.data.tasks import Task  # noqa: E402
from persona_agent.eval.harness import EvalStopped, run_eval  # noqa: E402
from persona_agent.runtime.progress import progress_bar  # noqa: E402
from persona_agent.runtime.store import Store  # noqa: E402
from persona_agent.settings import Settings  # noqa: E402

PARAMS = {"batch": "batch_size", "iterations": "iterations", "top_k": "top_k", "history": None}


def sweep(settings: Settings, store: Store, task: Task, *, users: list[UserData], methods: list[str], param: str,
          values: list[int], out: Path) -> pd.DataFrame:
    """`store`: opened with run-scoped memory; each point remembers only what it may see."""
    if param not in PARAMS:
        raise ValueError(f"unknown sweep parameter {param!r}; choose from {list(PARAMS)}")
    lm = build_lm(settings.lm)
    rows = []
    with mlflow.start_run(run_name=f"sweep-{task.key}-{param}-{time.strftime('%m%d-%H%M')}", tags=tracking.owner_tags("sweep")), \
            progress_bar(every=settings.progress_every) as progress:
        bar = progress.add_task("sweep", total=len(values) * len(users) * len(methods))
        mlflow.log_params(tracking.run_params(settings, task.key, lm=lm, param=param, values=",".join(map(str, values)),
                                              methods=",".join(methods), users=len(users),
                                              data_fingerprint=tracking.data_fingerprint(users)))
        for value in values:
            point = replace(settings, **{PARAMS[param]: value}) if PARAMS[param] else settings
            people = [cold_start(u, value) for u in users] if param == "history" else users
            started = time.perf_counter()
            run = run_eval(point, task, people, methods=methods, lm=lm, adapter=adapter_for(lm),
                           memory=store.scoped(f"{param}={value}"),
                           on_progress=lambda what: progress.update(bar, advance=1, description=f"{param}={value}: {what}"))
            if run.stopped:
                raise EvalStopped(f"stopped at {param}={value}: the LLM failed after its retries ({run.stopped})")
            results = run.results
            for r in results:
                rows.append({param: value, "method": r.method, **r.metrics, "lm_calls": r.lm_calls,
                             "setup_lm_calls": r.setup_lm_calls})
                mlflow.log_metrics({f"{r.method.replace('/', '_').replace(' ', '_')}_{m}": v for m, v in r.metrics.items()},
                                   step=value)
            mlflow.log_metric("point_seconds", time.perf_counter() - started, step=value)
        table = pd.DataFrame(rows)
        out.mkdir(parents=True, exist_ok=True)
        table.to_csv(out / f"sweep_{param}.csv", index=False)
        png = plot(table, task, param, path=out / f"sweep_{param}.png")
        mlflow.log_artifact(str(out / f"sweep_{param}.csv"))
        mlflow.log_artifact(str(png))
    return table


def cold_start(user: UserData, n: int) -> UserData:
    """The user with only their latest `n` history items (the paper's cold start uses 10)."""
    return replace(user, history=user.history[-n:] if n > 0 else [])


def plot(table: pd.DataFrame, task: Task, param: str, *, path: Path) -> Path:
    metric = task.metric_names[0]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for method, rows in table.groupby("method", sort=False):
        ax.plot(rows[param], rows[metric], marker="o", label=method)
    ax.set_xlabel({"batch": "alignment batch n", "iterations": "iterations T", "top_k": "retrieved memories K",
                   "history": "history items per user"}[param])
    ax.set_ylabel(f"{task.name} {metric}" + ("" if task.higher_is_better else " (lower is better)"))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
