"""`persona-agent eval`: the paper's comparison on any LaMP-format data with any LLM.

Writes the results table in the paper's layout (methods as rows, the task's Acc/F1 or MAE/RMSE as
columns, then cost) as CSV and markdown, a LaMP `golds`-format predictions file per method, and
an MLflow parent run with one child run per method.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import mlflow
import pandas as pd
from rich.console import Console

from . import tracking
from .atomic import atomic_write_text
from .config import Settings
from .progress import progress_bar
from .eval.data import UserData
from .eval.harness import MethodResult, run_eval
from .eval.tasks import Task
from .llm import adapter_for, build_lm
from .pipelines.memory import EpisodicMemory

SHORT = {"accuracy": "Acc", "f1": "F1", "mae": "MAE", "rmse": "RMSE"}


def evaluate(settings: Settings, task: Task, users: list[UserData], methods: list[str], out: Path,
             workers: int = 2, console: Console | None = None) -> pd.DataFrame:
    console = console or Console()
    tracking.setup(settings)
    lm = build_lm(settings.lm)
    memory = EpisodicMemory.open(path=str(settings.qdrant_path), url=settings.qdrant_url)
    started = time.perf_counter()
    try:
        with mlflow.start_run(run_name=f"eval-{task.key}") as parent, progress_bar(console) as progress:
            mlflow.log_params({"task": task.key, "users": len(users), "queries": sum(len(u.queries) for u in users),
                               "methods": ",".join(methods), "lm": settings.lm.model, "top_k": settings.top_k,
                               "batch_size": settings.batch_size, "iterations": settings.iterations,
                               "max_iters": settings.max_iters, "loss": settings.loss, "guard": settings.guard,
                               "workers": workers})
            bar = progress.add_task("eval", total=len(users) * len(methods))
            results = run_eval(settings, task, users, methods, lm, adapter_for(lm), memory, workers,
                               on_progress=lambda what: progress.update(bar, advance=1, description=what))
            table = results_table(task, results)
            write_outputs(out, task, table, results)
            for r in results:
                with mlflow.start_run(run_name=r.method, nested=True):
                    mlflow.log_param("method", r.method)
                    mlflow.log_metrics({**r.metrics, "lm_calls": r.lm_calls, "tokens": r.tokens,
                                        "setup_lm_calls": r.setup_lm_calls, "seconds_per_sample": r.seconds_per_sample,
                                        "failures": r.failures, "samples": r.samples})
            cost = sum(h.get("cost") or 0.0 for h in lm.history)
            mlflow.log_metrics({"wall_seconds": time.perf_counter() - started, "cost_usd": cost})
            mlflow.log_artifacts(str(out), artifact_path="results")
            run_id = parent.info.run_id
    finally:
        memory.close()
    console.print(table.to_string(float_format=lambda v: f"{v:.3f}"))
    console.print(f"wall time {time.perf_counter() - started:.0f} s; results in {out}; MLflow run {run_id}")
    return table


def results_table(task: Task, results: list[MethodResult]) -> pd.DataFrame:
    """The paper's layout: one row per method; the task's two metrics, then cost per sample."""
    rows = {}
    for r in results:
        row = {f"{task.name} {SHORT[m]}": r.metrics.get(m, float("nan")) for m in task.metric_names}
        row.update({"LM calls/sample": r.lm_calls / r.samples if r.samples else float("nan"),
                    "setup LM calls": r.setup_lm_calls, "s/sample": r.seconds_per_sample, "failures": r.failures})
        rows[r.method] = row
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.index.name = "method"
    return table


def write_outputs(out: Path, task: Task, table: pd.DataFrame, results: list[MethodResult]) -> None:
    """results.csv, results.md and predictions/<method>.json (LaMP `golds` format), atomically."""
    atomic_write_text(out / "results.csv", table.to_csv())
    atomic_write_text(out / "results.md", to_markdown(table))
    for r in results:
        golds = [{"id": qid, "output": task.normalize(a) or (a or "")} for qid, a in r.predictions.items()]
        atomic_write_text(out / "predictions" / f"{r.method.replace('/', '_').replace(' ', '_')}.json",
                          json.dumps({"task": task.name.replace("-", "_"), "golds": golds}, indent=1))


def to_markdown(table: pd.DataFrame) -> str:
    cols = [table.index.name or "", *table.columns]
    fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join([str(i), *(fmt(v) for v in row)]) + " |" for i, row in table.iterrows()]
    return "\n".join(lines) + "\n"


def default_out(settings: Settings, task: Task) -> Path:
    return settings.store / "eval" / f"{task.key}-{time.strftime('%Y%m%d-%H%M%S')}"

