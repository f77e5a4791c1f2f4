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
import re
import time
import zlib
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import dspy
import mlflow
import numpy as np
import pandas as pd
from dspy.utils.exceptions import is_retryable_lm_error
from rich.console import Console

from persona_agent.adapters import tracking
from persona_agent.adapters.llm import adapter_for, build_lm
from persona_agent.adapters.lm_cache import owned_by
from persona_agent.adapters.scorers import task_scorer
from persona_agent.data.atomic import atomic_write_text
from persona_agent.data.loaders import UserData
from persona_agent.data.tasks import Task
from persona_agent.eval.methods import METHODS, SETUP, UNALIGNED, NotApplicable, UserContext
from persona_agent.pipelines.flow import score
from persona_agent.pipelines.memory import EpisodicMemory, history_items
from persona_agent.pipelines.metering import Cost, is_lm_error, metered
from persona_agent.runtime.progress import library_prints, output, progress_bar, wall_seconds
from persona_agent.runtime.wiring import user_flow
from persona_agent.settings import Settings

log = logging.getLogger(__name__)

SHORT = {"accuracy": "Acc", "f1": "F1", "mae": "MAE", "rmse": "RMSE"}
BASELINES = ("non-personalized", "w/o alignment")  # what every method's difference is measured against


class EvalStopped(RuntimeError):
    """The LLM did not answer (refused the request, or failed after its retries): the run
    stopped, and the users that finished are scored."""


@dataclass
class MethodResult:
    method: str
    metrics: dict[str, float]
    samples: int
    lm_calls: int = 0  # answering only, issued (cache hits included)
    tokens: int = 0
    setup_lm_calls: int = 0  # profile and alignment, for the methods that use them
    seconds: float = 0.0
    failures: int = 0
    predictions: dict[str, str | None] = field(default_factory=dict)
    cache_hits: int = 0
    setup_cache_hits: int = 0
    invalid: int = 0  # answers LaMP's scorer reads as no label / no number
    errors: dict[str, float] = field(default_factory=dict)  # query id -> official per-query loss
    deltas: dict[str, "Delta"] = field(default_factory=dict)  # baseline -> difference to it
    unaligned: int = 0  # users it answered in its unaligned form (nothing to learn from)
    personas: dict[str, str] = field(default_factory=dict)  # unit -> the profile it answered with, if a persona

    @property
    def seconds_per_sample(self) -> float:
        return self.seconds / self.samples if self.samples else 0.0


@dataclass(frozen=True)
class Delta:
    """This method's primary metric minus a baseline's on the same n queries of `users` users,
    with a paired bootstrap 95% interval: users resampled with all their queries (the queries of
    one user are not independent) whenever any user has more than one, queries otherwise."""

    n: int
    value: float
    low: float
    high: float
    users: int = 0


@dataclass
class EvalRun:
    results: list[MethodResult]
    finished: list[str]  # user ids scored
    dropped: dict[str, str] = field(default_factory=dict)  # user id -> the LM error that dropped them
    stopped: str | None = None  # why the run stopped early, if it did
    outcomes: Counter = field(default_factory=Counter)  # every alignment's candidates, by outcome
    headroom: "Headroom | None" = None  # the share of the w/o alignment -> oracle gap alignment closes
    stopped_by: str | None = None  # the user whose LM error stopped it (`forget` finds its tag by this)
    steps: list[dict] = field(default_factory=list)  # every alignment iteration: what was written and its outcome


@dataclass
class _UserRun:
    """One user's answers and costs per method."""

    answers: dict[str, dict[str, str | None]] = field(default_factory=dict)
    cost: dict[str, Cost] = field(default_factory=dict)
    setup: dict[str, Cost] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    failures: dict[str, int] = field(default_factory=dict)
    outcomes: Counter = field(default_factory=Counter)  # alignment candidates by outcome
    unit: str = ""  # the history it ran on (`UserData.unit`)
    unaligned: dict[str, bool] = field(default_factory=dict)  # methods that answered unaligned (nothing to learn from)
    personas: dict[str, str] = field(default_factory=dict)  # method -> the profile its persona holds
    steps: list[dict] = field(default_factory=list)  # alignment iterations (`step_row`)


def run_eval(settings: Settings, task: Task, users: list[UserData], *, methods: list[str], lm: dspy.LM,
             adapter: dspy.Adapter, memory: EpisodicMemory, on_progress: Callable[[str], None] | None = None,
             keep_going: bool = False, method_runs: dict[str, str] | None = None) -> EvalRun:
    """Every method on every user (`method_runs`: method -> the MLflow run its traces, with
    `--trace`, belong to). An LM that still fails after its retries, in any method's
    setup or answer, is never scored as wrong answers: it stops the run (users still queued are
    not started; those that finish are scored), or with `keep_going` drops that user from every
    method."""
    # One flow (memory, profile, alignment) per history: two histories of one user (questions of
    # different dates) never share memory, so neither sees the other's items.
    flows = {u.unit: user_flow(settings, task, u.unit, history=history_items(task, u.history),
                               memory=memory) for u in users}
    for flow in flows.values():  # writes stay on this thread; workers only read
        flow.remember()

    def one_user(user: UserData) -> _UserRun:
        with dspy.context(lm=lm, adapter=adapter), owned_by(user.user_id):  # its cached answers are the user's
            return _run_user(user, UserContext(flows[user.unit], settings, user.rule), methods, on_progress=on_progress,
                             method_runs=method_runs or {})

    runs: dict[str, _UserRun] = {}
    dropped, stopped, stopped_by = {}, None, None
    with ThreadPoolExecutor(max_workers=max(1, settings.workers)) as pool:
        futures = {pool.submit(one_user, u): u for u in users}
        for future in as_completed(futures):
            if future.cancelled():
                continue
            user = futures[future]
            try:
                runs[user.unit] = future.result()
            except Exception as err:
                if not is_lm_error(err):
                    raise
                why = f"{type(err).__name__}: {' '.join(str(err).split())[:300]}"
                log.info("user %s: the LLM failed: %s", user.unit, why)  # said once, by the caller
                dropped[user.unit] = why
                if not keep_going and stopped is None:
                    after = f" after {settings.lm.retries} retries" if is_retryable_lm_error(err) else ""
                    stopped, stopped_by = f"the LLM failed{after} (user {user.unit}: {why})", user.user_id
                    for f in futures:
                        f.cancel()
    finished = [u for u in users if u.unit in runs]
    golds = {q.id: q.gold for u in finished for q in u.queries}
    results = [_pool(task, m, [runs[u.unit] for u in finished], golds=golds) for m in methods]
    clusters = {q.id: u.user_id for u in finished for q in u.queries}
    compare_to_baselines(results, clusters)
    outcomes = sum((runs[u.unit].outcomes for u in finished), Counter())
    steps = [{"user_id": u.user_id, "unit": u.unit, **row} for u in finished for row in runs[u.unit].steps]
    return EvalRun(results, [u.unit for u in finished], dropped, stopped, outcomes, headroom(results, clusters),
                   stopped_by, steps)


def _run_user(user: UserData, ctx: UserContext, methods: list[str], *, on_progress, method_runs: dict[str,
                                                                                                      str]) -> _UserRun:
    """`user`'s answers, costs and personas for every method, in order."""
    out = _UserRun(unit=user.unit)
    for method in methods:
        tags = {"user": user.user_id, "unit": user.unit, "method": method, "task": ctx.task.key,  # user: the person
                "run_id": method_runs.get(method)}
        try:  # setup (profile, alignment) is metered apart, in the user's flow
            with tracking.trace(f"{method} setup", **tags):
                program = METHODS[method](ctx)
        except NotApplicable as why:
            if method not in UNALIGNED:
                log.info("%s: %s", method, why)
                continue
            log.info("%s: %s; answering in its unaligned form", method, why)
            program, out.unaligned[method] = UNALIGNED[method](ctx), True
        persona = getattr(program, "persona", None)
        if persona is not None and persona.known:  # kept: the profile it answered with (what alignment wrote)
            out.personas[method] = persona.known
        started = time.perf_counter()
        with metered() as cost:
            scored = score(program, ctx.task, user.queries, who=f"user {user.user_id}, {method}, ",
                           around=lambda q: tracking.trace(f"{method} {q.id}", **tags, query=q.id))
        out.answers[method] = {q.id: a for q, a in zip(user.queries, scored.answers)}
        out.cost[method], out.failures[method] = cost, scored.failures
        out.seconds[method] = time.perf_counter() - started
        out.setup[method] = Cost()
        for name in SETUP.get(method, ()):
            out.setup[method] += ctx.setup_cost.get(name, Cost())
        if on_progress:
            on_progress(f"{user.user_id}: {method}")
    out.outcomes = Counter(s.kind for steps in ctx.steps.values() for s in steps)
    out.steps = [{"alignment": name, **step_row(s)} for name, steps in ctx.steps.items() for s in steps]
    return out


def step_row(step) -> dict:
    """An alignment iteration as a table row: what the rewriter wrote (equal to the profile before
    when it wrote none), how it was counted, and what the profile check found in a refusal."""
    return {"iteration": step.iteration, "outcome": step.kind, "problem": step.problem,
            "batch_score": step.batch_score, "candidate_score": step.candidate_score,
            "profile_before": step.profile_before, "profile_after": step.profile_after}


def _pool(task: Task, method: str, runs: list[_UserRun], *, golds: dict[str, str | None]) -> MethodResult:
    runs = [r for r in runs if method in r.answers]  # users the method applied to
    answers = {qid: a for r in runs for qid, a in r.answers[method].items()}
    scored = [qid for qid in answers if golds.get(qid) is not None]
    metrics = task.score([golds[q] for q in scored], [answers[q] for q in scored]) if scored else {}
    errors = dict(zip(scored, task.errors([golds[q] for q in scored], [answers[q] for q in scored])))
    result = MethodResult(method, metrics, len(answers), predictions=answers, errors=errors,
                          invalid=task.invalid(list(answers.values())))
    for r in runs:
        result.lm_calls += r.cost[method].lm_calls
        result.cache_hits += r.cost[method].cache_hits
        result.tokens += r.cost[method].tokens
        result.setup_lm_calls += r.setup[method].lm_calls
        result.setup_cache_hits += r.setup[method].cache_hits
        result.seconds += r.seconds[method]
        result.failures += r.failures[method]
        result.unaligned += r.unaligned.get(method, False)
    result.personas = {r.unit: r.personas[method] for r in runs if method in r.personas}
    return result


def resampling_units(queries: list[str], clusters: dict[str, str]) -> list[list[str]]:
    """The independent units a bootstrap resamples: each user with all their queries whenever any
    user has more than one, else each query."""
    by_user: dict[str, list[str]] = {}
    for q in queries:
        by_user.setdefault(clusters.get(q, q), []).append(q)
    return list(by_user.values()) if max(len(v) for v in by_user.values()) > 1 else [[q] for q in queries]


def cluster_bootstrap(diff: dict[str, float], clusters: dict[str, str], rng: np.random.Generator,
                      *, resamples: int = 2000) -> tuple[float, float, float, int]:
    """(mean, 2.5th and 97.5th percentile of the resampled means, independent units) of per-query
    differences. The units resampled are the users (each with all their queries, the mean taken
    over the queries drawn) whenever any user has more than one query; queries otherwise."""
    value = float(np.mean(list(diff.values())))
    units = [[diff[q] for q in unit] for unit in resampling_units(sorted(diff), clusters)]
    sums = np.array([sum(u) for u in units])
    counts = np.array([len(u) for u in units])
    draws = rng.integers(0, len(units), size=(resamples, len(units)))
    means = sums[draws].sum(axis=1) / counts[draws].sum(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return value, float(low), float(high), len(units)


def _pair_rng(seed: int, method: str, baseline: str) -> np.random.Generator:
    """One generator per (method, baseline) pair: an interval does not depend on which other
    methods ran, or in what order."""
    return np.random.default_rng([seed, zlib.crc32(f"{method}|{baseline}".encode())])


def compare_to_baselines(results: list[MethodResult], clusters: dict[str, str] | None = None,
                         resamples: int = 2000, *, seed: int = 0) -> None:
    """Fill each result's `deltas`: its mean per-query loss subtracted from each baseline's
    (so positive is better: accuracy gained, or MAE saved), over the queries both scored, with a
    paired cluster bootstrap interval (`clusters`: query id -> user id; none: every query its own)."""
    by = {r.method: r for r in results}
    clusters = clusters or {}
    for base in (by[b] for b in BASELINES if b in by):
        for r in results:
            common = sorted(set(r.errors) & set(base.errors))
            if r is base or not common:
                continue
            diff = {q: base.errors[q] - r.errors[q] for q in common}
            value, low, high, _ = cluster_bootstrap(diff, clusters, _pair_rng(seed, r.method, base.method),
                                                    resamples=resamples)
            users = len({clusters.get(q, q) for q in common})
            r.deltas[base.method] = Delta(len(common), value, low, high, users)


@dataclass(frozen=True)
class Headroom:
    """How much of the gap between `w/o alignment` and `oracle` alignment closes: (persona-agent
    - w/o alignment) / (oracle - w/o alignment), with a paired cluster bootstrap interval. `gap`
    is oracle - w/o alignment (positive: the oracle's profile helps this answer model)."""

    gap: float
    gap_low: float
    gap_high: float
    closed: float | None
    low: float | None
    high: float | None
    n: int
    users: int

    def says(self) -> str:
        gap = f"gap {self.gap:+.3f} [{self.gap_low:+.3f}, {self.gap_high:+.3f}], n={self.n}, {self.users} users"
        if self.gap <= 0:
            return (f"the oracle's profile does not beat w/o alignment here ({gap}): the answer model, not the "
                    "optimizer, is the limit; alignment has nothing to close")
        closed = "n/a" if self.low is None else f"{self.closed:+.2f} [{self.low:+.2f}, {self.high:+.2f}]"
        doubt = "; the gap itself is not clearly above zero at this n" if self.gap_low <= 0 else ""
        return f"alignment closes {closed} of the gap between w/o alignment and oracle ({gap}){doubt}"


def headroom(results: list[MethodResult], clusters: dict[str, str], resamples: int = 2000,
             *, seed: int = 0) -> Headroom | None:
    by = {r.method: r for r in results}
    if not {"persona-agent", "w/o alignment", "oracle"} <= by.keys():
        return None
    ours, base, top = by["persona-agent"], by["w/o alignment"], by["oracle"]
    common = sorted(set(ours.errors) & set(base.errors) & set(top.errors))
    if not common:
        return None
    gain = {q: base.errors[q] - ours.errors[q] for q in common}
    gap = {q: base.errors[q] - top.errors[q] for q in common}
    units = resampling_units(common, clusters)
    rng = _pair_rng(seed, "persona-agent", "oracle")
    draws = rng.integers(0, len(units), size=(resamples, len(units)))
    gains = np.array([sum(gain[q] for q in u) for u in units])
    gaps = np.array([sum(gap[q] for q in u) for u in units])
    counts = np.array([len(u) for u in units])
    gap_means = gaps[draws].sum(axis=1) / counts[draws].sum(axis=1)
    g_low, g_high = np.percentile(gap_means, [2.5, 97.5])
    total_gap = gaps.sum()
    closed = low = high = None
    if total_gap > 0:
        closed = float(gains.sum() / total_gap)
        ratios = np.array([gains[d].sum() / gaps[d].sum() for d in draws if gaps[d].sum() > 0])
        if len(ratios):
            low, high = (float(x) for x in np.percentile(ratios, [2.5, 97.5]))
    return Headroom(float(total_gap / len(common)), float(g_low), float(g_high), closed, low, high, len(common),
                    len({clusters.get(q, q) for q in common}))


def evaluate(settings: Settings, task: Task, users: list[UserData], *, methods: list[str], out: Path,
             memory: EpisodicMemory, console: Console | None = None, keep_going: bool = False,
             source: str = "shipped", wide: bool = False) -> pd.DataFrame:
    """Run, write the outputs, log the MLflow runs, print the table (`wide`: every column). Raises `EvalStopped` (after
    writing the finished users' table) when the LLM failed and `keep_going` is off."""
    console = console or output()
    lm = build_lm(settings.lm)
    started = time.perf_counter()
    with mlflow.start_run(run_name=tracking.run_name("eval", task.key, settings, users=len(users), lm=lm),
                          tags=tracking.owner_tags("eval")) as parent, \
            progress_bar(every=settings.progress_every) as progress:
        params = tracking.run_params(settings, task.key, lm=lm, data=source, data_fingerprint=tracking.data_fingerprint(users))
        mlflow.log_params({**params, "users": len(users), "queries": max((len(u.queries) for u in users), default=0),
                           "queries_total": sum(len(u.queries) for u in users),
                           "methods": ",".join(methods), "workers": settings.workers, "cache": settings.lm.cache,
                           "keep_going": keep_going})
        bar = progress.add_task("eval", total=len(users) * len(methods))
        client = mlflow.MlflowClient()  # each method's run exists before it answers: its traces hang there
        method_runs = {m: client.create_run(parent.info.experiment_id, run_name=m, tags={  # owned like the parent:
            "mlflow.parentRunId": parent.info.run_id, **tracking.owner_tags()}).info.run_id  # closed if we die
                       for m in methods}
        run = run_eval(settings, task, users, methods=methods, lm=lm, adapter=adapter_for(lm), memory=memory,
                       keep_going=keep_going,
                       on_progress=lambda what: progress.update(bar, advance=1, description=what),
                       method_runs=method_runs)
        table = results_table(task, run.results)
        write_outputs(out, task, table, results=run.results, room=run.headroom,
                      owners={q.id: u.user_id for u in users for q in u.queries})
        owner = {u.unit: u.user_id for u in users}
        for r in run.results:
            with mlflow.start_run(run_id=method_runs[r.method], nested=True):
                mlflow.log_params({**params, "method": r.method})
                mlflow.log_table(_predictions(task, users, r), "predictions.json")
                if r.personas:  # the profiles this method answered with: what an alignment wrote, per history
                    mlflow.log_table(pd.DataFrame({"user_id": [owner[unit] for unit in r.personas],
                                                   "unit": list(r.personas), "profile": list(r.personas.values())}),
                                     "personas.json")
                mlflow.log_metrics({**r.metrics, **_delta_metrics(r), "lm_calls": r.lm_calls,
                                    "cache_hits": r.cache_hits,
                                    "tokens": r.tokens, "setup_lm_calls": r.setup_lm_calls,
                                    "setup_cache_hits": r.setup_cache_hits, "seconds_per_sample": r.seconds_per_sample,
                                    "failures": r.failures, "invalid": r.invalid, "samples": r.samples})
            with library_prints():  # the same answers, scored where MLflow's Evaluations view looks
                tracking.log_evaluation(_evaluation_rows(users, r), [task_scorer(task)], method_runs[r.method])
        cost = sum(h.get("cost") or 0.0 for h in lm.history)
        mlflow.log_metrics({"wall_seconds": wall_seconds(started), "cost_usd": cost,
                            "users_scored": len(run.finished), "users_dropped": len(run.dropped)})
        mlflow.log_metrics(_method_metrics(run.results))
        mlflow.log_metrics({f"alignment_{_metric_name(k)}": v for k, v in run.outcomes.items()})
        if run.headroom is not None:
            h = run.headroom
            mlflow.log_metrics({"oracle_gap": h.gap, "oracle_gap_low": h.gap_low, "oracle_gap_high": h.gap_high,
                                **({"gap_closed": h.closed} if h.closed is not None else {}),
                                **({"gap_closed_low": h.low, "gap_closed_high": h.high} if h.low is not None else {})})
        mlflow.log_dict(dict(run.outcomes), "alignment_outcomes.json")
        if run.steps:  # every candidate's text: what `bench/profile_check.py` reads back
            mlflow.log_table(pd.DataFrame(run.steps), "alignment_steps.json")
        mlflow.set_tags({"partial": str(run.stopped is not None).lower(),
                         **({"stopped": run.stopped[:500], "stopped_user": run.stopped_by} if run.stopped else {})})
        mlflow.log_artifacts(str(out), artifact_path="results")
        run_id = parent.info.run_id
    shown = table if wide else compact(task, table)
    console.print(f"{task.name}, {len(run.finished)} users, {sum(len(u.queries) for u in users)} queries"
                  + ("" if wide else f"; {cost_note(shown)}; --wide: every column"))
    console.print(shown.to_string(float_format=lambda v: f"{v:.3f}"))
    if run.headroom is not None:
        console.print(run.headroom.says())
    if run.outcomes:
        console.print("alignment candidates: " + ", ".join(f"{k} {v}" for k, v in run.outcomes.most_common()))
    for user_id, why in run.dropped.items():
        console.print(f"dropped: user {user_id} from every method ({why})")
    console.print(f"{len(run.finished)} of {len(users)} users scored; wall time {wall_seconds(started):.0f} s; "
                  f"results in {out}; MLflow run {run_id}; {tracking.ui_hint()}")
    if run.stopped:
        raise EvalStopped(f"{run.stopped}; the table of the "
                          f"{len(run.finished)} users that finished is in {out} "
                          "(--keep-going drops failing users instead)")
    return table


def _predictions(task: Task, users: list[UserData], r: MethodResult) -> pd.DataFrame:
    """One row per query this method answered: the failing ones are a filter away in the MLflow UI."""
    asked = {q.id: (u.user_id, q.gold) for u in users for q in u.queries}
    rows = [{"user_id": asked[qid][0], "query_id": qid, "gold": asked[qid][1], "answer": answer,
             "score": None if asked[qid][1] is None else task.example_score(asked[qid][1], answer)}
            for qid, answer in r.predictions.items() if qid in asked]
    return pd.DataFrame(rows, columns=["user_id", "query_id", "gold", "answer", "score"])


def _evaluation_rows(users: list[UserData], r: MethodResult) -> list[dict]:
    """The method's answers to queries with a gold, as `mlflow.genai.evaluate` reads static rows."""
    return [{"query": q.id, "inputs": {"user_id": u.user_id, "query_id": q.id, "query": q.input},
             "outputs": r.predictions[q.id] or "", "expectations": {"expected_response": q.gold},
             "tags": {"user": u.user_id, "method": r.method, "query": q.id}}
            for u in users for q in u.queries if q.gold is not None and q.id in r.predictions]


def _metric_name(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


def _method_metrics(results: list[MethodResult]) -> dict[str, float]:
    """Every method's quality on the parent run, `<metric>/<method>` (the UI charts each metric's
    methods together, and compares two evals' parent runs side by side), with its differences
    to the baselines and their intervals."""
    out = {}
    for r in results:
        name = _metric_name(r.method)
        out.update({f"{metric}/{name}": value for metric, value in r.metrics.items()})
        out.update({f"{key}/{name}": value for key, value in _delta_metrics(r).items()})
    return out


def _delta_metrics(r: MethodResult) -> dict[str, float]:
    out = {}
    for base, d in r.deltas.items():
        key = "delta_vs_" + _metric_name(base)
        out.update({key: d.value, f"{key}_low": d.low, f"{key}_high": d.high, f"{key}_n": d.n})
    return out


def results_table(task: Task, results: list[MethodResult]) -> pd.DataFrame:
    """The paper's layout: one row per method; the task's two metrics, invalid answers, the
    difference to each baseline with its interval (positive: better), then cost per sample."""
    rows = {}
    for r in results:
        row = {f"{task.name} {SHORT[m]}": r.metrics.get(m, float("nan")) for m in task.metric_names}
        row["invalid"] = r.invalid
        for base in BASELINES:
            d = r.deltas.get(base)
            nan = float("nan")
            row.update({f"Δ {base}": d.value if d else nan, f"Δ {base} low": d.low if d else nan,
                        f"Δ {base} high": d.high if d else nan, f"Δ {base} n": d.n if d else nan,
                        f"Δ {base} users": d.users if d else nan})
        row["n"] = len(r.errors)
        row["unaligned users"] = r.unaligned
        per = (lambda v: v / r.samples) if r.samples else (lambda v: float("nan"))
        row.update({"LM calls/sample": per(r.lm_calls), "cached/sample": per(r.cache_hits),
                    "tokens/sample": per(r.tokens), "s/sample": r.seconds_per_sample,
                    "setup LM calls": r.setup_lm_calls, "setup cached": r.setup_cache_hits, "failures": r.failures})
        rows[r.method] = row
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.index.name = "method"
    return table


def compact(task: Task, table: pd.DataFrame) -> pd.DataFrame:
    """The table for an 80-column terminal: the task's primary metric, the difference to `w/o
    alignment` with its interval, n, and LM calls and seconds per answer."""
    out = pd.DataFrame(index=table.index)
    primary = SHORT[task.metric_names[0]]
    out[primary] = table[f"{task.name} {primary}"]
    base = "w/o alignment"
    if f"Δ {base}" in table and table[f"Δ {base}"].notna().any():
        out[f"Δ {base} [95% CI]"] = ["" if pd.isna(v) else f"{v:+.3f} [{lo:+.3f}, {hi:+.3f}]" for v, lo, hi in
                                     table[[f"Δ {base}", f"Δ {base} low", f"Δ {base} high"]].itertuples(index=False)]
    out["n"] = table["n"]
    out["calls"] = table["LM calls/sample"]  # per answer, issued: what the method needs, whoever's cache answered
    if not (table["cached/sample"].fillna(0) > 0).any():  # a fresh pass: each method's seconds are its own
        out["s"] = table["s/sample"]
    return out


def cost_note(shown: pd.DataFrame) -> str:
    """What the table's cost columns mean (with the cache on, a call another method made first
    costs the next one nothing, so seconds would rank methods by their order)."""
    if "s" in shown:
        return "LM calls and seconds per answer"
    return ("LM calls per answer (no seconds: answers came from the LM cache, where a call one method made costs the "
            "next nothing; --no-cache times each method on its own)")


def write_outputs(out: Path, task: Task, table: pd.DataFrame, *, results: list[MethodResult],
                  room: Headroom | None = None, owners: dict[str, str] | None = None) -> None:
    """results.csv, results.md and predictions/<method>.json (LaMP `golds` format, the answers as
    LaMP's scorer will read them; each row also names its user, from `owners`, which LaMP's
    scorer ignores and `forget` needs), atomically."""
    atomic_write_text(out / "results.csv", table.to_csv())
    atomic_write_text(out / "results.md", to_markdown(table) + (f"\n{room.says()}\n" if room else ""))
    owners = owners or {}
    for r in results:
        golds = [{"id": qid, "output": (a or "").strip(), **({"user_id": owners[qid]} if qid in owners else {})}
                 for qid, a in r.predictions.items()]
        atomic_write_text(out / "predictions" / f"{r.method.replace('/', '_').replace(' ', '_')}.json",
                          json.dumps({"task": task.name.replace("-", "_"), "golds": golds}, indent=1))


def to_markdown(table: pd.DataFrame) -> str:
    """The table for a reader: each difference with its interval in one cell, NaN as n/a."""
    table = table.copy()
    for base in BASELINES:
        cols = [f"Δ {base}", f"Δ {base} low", f"Δ {base} high", f"Δ {base} n", f"Δ {base} users"]
        if cols[0] in table:
            cells = ["n/a" if pd.isna(v) else f"{v:+.3f} [{lo:+.3f}, {hi:+.3f}] (n={n:.0f}, {u:.0f} users)"
                     for v, lo, hi, n, u in table[cols].itertuples(index=False)]
            at = list(table.columns).index(cols[0])
            table = table.drop(columns=cols)
            table.insert(at, f"Δ {base} [95% CI]", cells)
    cols = [table.index.name or "", *table.columns]
    fmt = lambda v: "n/a" if isinstance(v, float) and pd.isna(v) else f"{v:.3f}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join([str(i), *(fmt(v) for v in row)]) + " |" for i, row in table.iterrows()]
    return "\n".join(lines) + "\n"


def default_out(settings: Settings, task: Task) -> Path:
    return settings.eval_out(task.key, time.strftime('%Y%m%d-%H%M%S'))
