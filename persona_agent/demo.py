"""`persona-agent demo`: the whole method on a few users of a shipped task, tracked in MLflow.

Per user: write memory, write the profile and the initial persona, score it and the
non-personalized baseline on held-out queries, align, score again. Every persona revision is a
version of the user's prompt in MLflow's registry; the table is printed and logged.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from pathlib import Path

import dspy
import mlflow
import pandas as pd
from rich.console import Console
from rich.table import Table

from persona_agent.adapters import tracking
from persona_agent.adapters.llm import adapter_for, build_lm
from persona_agent.adapters.lm_cache import owned_by
from persona_agent.data.loaders import UserData, load_users
from persona_agent.data.synthetic import shipped_data_dir
from persona_agent.data.tasks import get_task
from persona_agent.optimizers import AlignmentStep
from persona_agent.pipelines.agent import non_personalized
from persona_agent.pipelines.flow import score
from persona_agent.pipelines.memory import history_items
from persona_agent.pipelines.metering import metered
from persona_agent.runtime.progress import output, progress_bar, wall_seconds
from persona_agent.runtime.store import Store
from persona_agent.runtime.wiring import alignment, user_flow
from persona_agent.settings import Settings

log = logging.getLogger(__name__)


def run_demo(settings: Settings, store: Store, task_key: str = "lamp2m", *, users: int = 3, queries: int = 3,
             data: Path | None = None, console: Console | None = None, lm: dspy.LM | None = None,
             which: str = "readable-drift") -> pd.DataFrame:
    """`store`: opened with persistent memory, which keeps the users' histories afterwards.
    `lm`: an LM object to use instead of building one from `settings.lm`. `which`: the shipped
    set, without `data` (`data.synthetic.SETS`)."""
    console = console or output()
    task = get_task(task_key)
    people = load_users(data or shipped_data_dir(task, which), task)[:users]
    lm = lm or build_lm(settings.lm)
    rows, started = [], time.perf_counter()
    steps_per_user = 4 + settings.iterations
    with dspy.context(lm=lm, adapter=adapter_for(lm)), \
            mlflow.start_run(run_name=tracking.run_name("demo", task.key, settings, users=len(people), lm=lm),
                             tags=tracking.owner_tags("demo")) as parent, \
            progress_bar(every=settings.progress_every) as progress:
        params = tracking.run_params(settings, task.key, lm=lm, data=str(data or f"shipped:{which}"),
                                     data_fingerprint=tracking.data_fingerprint(people))
        mlflow.log_params({**params, "users": len(people), "queries": queries})
        bar = progress.add_task("demo", total=len(people) * steps_per_user)
        profiles, steps = {}, []
        for user in people:
            row, aligned = _demo_user(settings, store, user, n_queries=queries, progress=progress, bar=bar,
                                      params=params)
            rows.append(row)
            profiles[user.user_id], steps = aligned.persona.profile, steps + aligned.alignment_steps
        table = _table(rows, task)
        candidates = candidate_counts(steps)
        _log_table(table, parent.info.run_id)
        mlflow.log_metrics({"wall_seconds": wall_seconds(started),
                            **{f"candidates_{k}": v for k, v in candidates.items() if isinstance(v, int)}})
    console.print(_rich_table(table, f"{task.name}: {len(people)} users, {queries} held-out queries each"))
    console.print("[bold]production profiles[/bold]")
    for user_id, profile in profiles.items():
        console.print(f"  {user_id}: {profile}", markup=False, highlight=False)
    console.print(f"alignment candidates: {candidates['written']} written, {candidates['valid']} passed the profile "
                  f"check, {candidates['accepted']} accepted; {candidates['why']}", markup=False, highlight=False)
    console.print(f"wall time {wall_seconds(started):.0f} s; MLflow run {parent.info.run_id}; {tracking.ui_hint()}")
    return table


def candidate_counts(steps: list[AlignmentStep]) -> dict:
    """How an alignment's iterations ended: candidates written, valid (passed the profile check
    and were scored, or accepted unscored), accepted, and every outcome with its count."""
    written = [s for s in steps if s.wrote_candidate]
    outcomes = Counter(s.kind for s in steps)
    return {"iterations": len(steps), "written": len(written),
            "valid": sum(s.candidate_score is not None or s.accepted for s in written),
            "accepted": sum(s.accepted for s in steps),
            "why": ", ".join(f"{n} {outcome}" for outcome, n in outcomes.most_common()) or "no iterations"}


def _demo_user(settings: Settings, store: Store, user: UserData, *, n_queries: int, progress, bar,
               params: dict) -> dict:
    held_out = user.queries[:n_queries]
    def advance(what: str, steps: int = 1) -> None:
        progress.update(bar, advance=steps, description=f"{user.user_id}: {what}")

    # tagged as theirs when it starts: a demo killed mid-user leaves a run `forget` still finds
    with mlflow.start_run(run_name=user.user_id, nested=True, tags={"user_id": user.user_id}) as run:
        mlflow.log_params({**params, "user_id": user.user_id})
        with metered() as cost, owned_by(user.user_id):  # its cached answers are the user's
            aligned, version, scores = _personalize(settings, store, user, held_out=held_out, run_id=run.info.run_id,
                                                    advance=advance)
        row = {"user": user.user_id}
        for name, scored in zip(COLUMNS, scores):
            row.update({f"{name} {metric}": value for metric, value in scored.metrics.items()})
        row.update(answers=len(held_out) * 3, parsed=sum(s.parsed for s in scores),
                   failures=sum(s.failures for s in scores), lm_calls=cost.lm_calls, tokens=cost.tokens,
                   persona_version=version)
        mlflow.log_metrics({k.replace(" ", "_"): float(v) for k, v in row.items() if isinstance(v, (int, float))})
        mlflow.log_text(aligned.persona.render(), "persona.txt")
        mlflow.set_tag("production_profile", aligned.persona.profile[:5000])
        mlflow.log_table(pd.DataFrame([
            {"query_id": q.id, "gold": q.gold, **{name: answer for name, answer in zip(COLUMNS, answers)},
             **{f"{name} score": user.task.example_score(q.gold, answer) for name, answer in zip(COLUMNS, answers)}}
            for q, *answers in zip(held_out, *(s.answers for s in scores))]), "predictions.json")
    return row, aligned


def _personalize(settings, store, user, *, held_out, run_id, advance):
    """Profile, persona v1, baseline and before-scores, alignment, after-score."""
    task, registry = user.task, store.registry(user.task)
    flow = user_flow(settings, task, user.user_id, history=history_items(task, user.history), memory=store.memory)
    flow.remember()
    student = flow.agent()
    registry.register(user.user_id, student.persona, "initial persona from the profile",
                      tags={"stage": "initial", "accepted": True, "run_id": run_id}, production=True)
    advance("profile")
    baseline = score(non_personalized(task), task, held_out)
    advance("baseline")
    before = score(student, task, held_out)
    advance("before alignment")

    def on_step(step: AlignmentStep) -> None:
        mlflow.log_metrics({"align_batch_score": step.batch_score, "align_lm_calls": step.lm_calls,
                            "align_tokens": step.tokens, "align_accepted": float(step.accepted)}, step=step.iteration)
        if step.wrote_candidate:  # rejected candidates are registered too, but never promoted
            registry.register(user.user_id, student.persona.with_profile(step.profile_after),
                              f"alignment iteration {step.iteration + 1}: {step.reason}",
                              tags={"stage": "aligned", "iteration": step.iteration + 1, "accepted": step.accepted,
                               "reason": step.reason, "batch_score": f"{step.batch_score:.3f}",
                               "candidate_score": "" if step.candidate_score is None else f"{step.candidate_score:.3f}",
                               "lm_calls": step.lm_calls, "tokens": step.tokens, "run_id": run_id},
                              production=step.accepted)
        advance(f"alignment {step.iteration + 1}: {step.reason}")

    aligned = flow.align(alignment(settings, on_step=on_step), student)
    progress_rest = settings.iterations - len(aligned.alignment_steps)  # an early stop skips the remaining steps
    if progress_rest:
        advance(f"stopped early ({progress_rest} iterations not needed)", progress_rest)
    after = score(aligned, task, held_out)
    advance("after alignment")
    return aligned, registry.production_version(user.user_id), (baseline, before, after)


def _table(rows: list[dict], task) -> pd.DataFrame:
    table = pd.DataFrame(rows).set_index("user")
    mean = table.mean(numeric_only=True)
    for col in ("answers", "parsed", "failures", "lm_calls", "tokens"):
        mean[col] = table[col].sum()
    mean["persona_version"] = float("nan")
    table.loc["all"] = mean
    return table


def _log_table(table: pd.DataFrame, run_id: str) -> None:
    client = mlflow.MlflowClient()
    overall = table.loc["all"]
    for col, value in overall.items():
        if pd.notna(value):
            client.log_metric(run_id, col.replace(" ", "_"), float(value))
    client.log_metric(run_id, "parse_rate", float(overall["parsed"] / max(overall["answers"], 1)))
    client.log_text(run_id, table.to_csv(), "results.csv")


COLUMNS = ("non-personalized", "before alignment", "after alignment")


def _rich_table(table: pd.DataFrame, title: str) -> Table:
    """One column per method with its two metrics, then the cost columns."""
    metrics = [c.split(" ")[-1] for c in table.columns if c.startswith(COLUMNS[0])]
    out = Table(title=title)
    out.add_column("user")
    for method in COLUMNS:
        out.add_column(f"{method}\n{' / '.join(metrics)}", justify="right")
    for col in ("parsed", "answers", "lm_calls"):
        out.add_column(col.replace("_", " "), justify="right")
    for user, row in table.iterrows():
        cells = [" / ".join(f"{row[f'{m} {k}']:.3f}" for k in metrics) for m in COLUMNS]
        out.add_row(str(user), *cells, *(f"{int(row[c])}" for c in ("parsed", "answers", "lm_calls")))
    return out
