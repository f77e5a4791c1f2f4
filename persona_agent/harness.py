"""`persona-agent eval`: the paper's comparison on any LaMP-format data with any LLM.

Every method runs on every user's queries; users run in a bounded thread pool (each worker
opens its own DSPy context and cost meter), and memory is written once up front, on this
thread. Answers are pooled over users per method and scored with the task's metrics; queries
without gold (a LaMP test split) still get predictions.

Writes the results table in the paper's layout (methods as rows, the task's Acc/F1 or MAE/RMSE
as columns, then cost) as CSV and markdown, a LaMP `golds`-format predictions file per method,
and an MLflow parent run with one child run per method.
"""

from __future__ import annotations

import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import dspy
import mlflow
import pandas as pd
from rich.console import Console

from .eval.atomic import atomic_write_text
from .eval.data import UserData
from .eval.tasks import Task
from .llm import adapter_for, build_lm
from .methods import METHODS, SETUP, UserContext, user_flow
from .pipelines.flow import history_items
from .pipelines.memory import EpisodicMemory
from .pipelines.metering import Cost, answer_or_none, metered
from .progress import progress_bar
from .settings import Settings

log = logging.getLogger(__name__)

SHORT = {"accuracy": "Acc", "f1": "F1", "mae": "MAE", "rmse": "RMSE"}


@dataclass
class MethodResult:
    method: str
    metrics: dict[str, float]
    samples: int
    lm_calls: int = 0  # answering only
    tokens: int = 0
    setup_lm_calls: int = 0  # profile and alignment, for the methods that use them
    seconds: float = 0.0
    failures: int = 0
    predictions: dict[str, str | None] = field(default_factory=dict)

    @property
    def seconds_per_sample(self) -> float:
        return self.seconds / self.samples if self.samples else 0.0


@dataclass
class _UserRun:
    """One user's answers and costs per method."""

    answers: dict[str, dict[str, str | None]] = field(default_factory=dict)
    cost: dict[str, Cost] = field(default_factory=dict)
    setup: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    failures: dict[str, int] = field(default_factory=dict)


def run_eval(settings: Settings, task: Task, users: list[UserData], methods: list[str], lm: dspy.LM,
             adapter: dspy.Adapter, memory: EpisodicMemory,
             on_progress: Callable[[str], None] | None = None) -> list[MethodResult]:
    flows = {u.user_id: user_flow(settings, task, u.user_id, history_items(task, u.profile), memory) for u in users}
    for flow in flows.values():  # writes stay on this thread; workers only read
        flow.remember()

    def one_user(user: UserData) -> _UserRun:
        with dspy.context(lm=lm, adapter=adapter):
            return _run_user(user, UserContext(flows[user.user_id], settings), methods, on_progress)

    runs: list[_UserRun] = []
    with ThreadPoolExecutor(max_workers=max(1, settings.workers)) as pool:
        futures = {pool.submit(one_user, u): u for u in users}
        for future in as_completed(futures):
            runs.append(future.result())
    golds = {q.id: q.gold for u in users for q in u.queries}
    return [_pool(task, m, runs, golds) for m in methods]


def _run_user(user: UserData, ctx: UserContext, methods: list[str], on_progress) -> _UserRun:
    out = _UserRun()
    for method in methods:
        answers, failures = {}, 0
        try:  # setup (profile, alignment) is metered apart, in the user's flow
            program = METHODS[method](ctx)
        except Exception as err:  # a method that cannot be set up for this user scores as wrong
            log.warning("user %s, %s: setup failed: %s", user.user_id, method, str(err)[:200])
            program = None
        started = time.perf_counter()
        with metered() as cost:
            for q in user.queries:
                answers[q.id] = (answer_or_none(program, q.input, f"user {user.user_id}, {method}, query {q.id}")
                                 if program is not None else None)
                failures += answers[q.id] is None
        out.answers[method], out.cost[method], out.failures[method] = answers, cost, failures
        out.seconds[method] = time.perf_counter() - started
        out.setup[method] = sum(ctx.setup_cost[s].lm_calls for s in SETUP.get(method, ()) if s in ctx.setup_cost)
        if on_progress:
            on_progress(f"{user.user_id}: {method}")
    return out


def _pool(task: Task, method: str, runs: list[_UserRun], golds: dict[str, str | None]) -> MethodResult:
    answers = {qid: a for r in runs for qid, a in r.answers[method].items()}
    scored = [qid for qid in answers if golds.get(qid) is not None]
    metrics = task.score([golds[q] for q in scored], [answers[q] for q in scored]) if scored else {}
    result = MethodResult(method, metrics, len(answers), predictions=answers)
    for r in runs:
        result.lm_calls += r.cost[method].lm_calls
        result.tokens += r.cost[method].tokens
        result.setup_lm_calls += r.setup[method]
        result.seconds += r.seconds[method]
        result.failures += r.failures[method]
    return result


def evaluate(settings: Settings, task: Task, users: list[UserData], methods: list[str], out: Path,
             memory: EpisodicMemory, console: Console | None = None) -> pd.DataFrame:
    """Run, write the outputs, log the MLflow runs, print the table."""
    console = console or Console()
    lm = build_lm(settings.lm)
    started = time.perf_counter()
    with mlflow.start_run(run_name=f"eval-{task.key}") as parent, progress_bar(console) as progress:
        mlflow.log_params({"task": task.key, "users": len(users), "queries": sum(len(u.queries) for u in users),
                           "methods": ",".join(methods), "lm": settings.lm.model, "top_k": settings.top_k,
                           "batch_size": settings.batch_size, "iterations": settings.iterations,
                           "max_iters": settings.max_iters, "loss": settings.loss, "guard": settings.guard,
                           "workers": settings.workers})
        bar = progress.add_task("eval", total=len(users) * len(methods))
        results = run_eval(settings, task, users, methods, lm, adapter_for(lm), memory,
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
