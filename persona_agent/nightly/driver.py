"""`persona-agent nightly`: re-align every user whose history changed since the last run.

The driver plans, starts the users on an executor (`executors`), commits each outcome through
the commit process (`committer`) as it arrives, and logs the night; `control` stops it.

One run per store at a time (a lock file); users run on a bounded thread pool; every result is
committed as it arrives, so a crash loses at most the users in flight, and a rerun finishes them
(see `jobs`). SIGINT or SIGTERM stops the run: no user starts, no LM call is made after
it, the users that finished are committed, the others are left for the next run.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import shlex
import sys
import threading
import time

import dspy
import mlflow
import pandas as pd
from filelock import FileLock, Timeout
from rich.console import Console

from persona_agent.adapters import tracking
from persona_agent.adapters.llm import adapter_for, build_lm
from persona_agent.adapters.state import StateStore
from persona_agent.data.tasks import Task
from persona_agent.nightly.committer import Committer
from persona_agent.nightly.control import Deferred, Gate, Stopped, first_callback_of, stop_on_signals, user_calls
from persona_agent.nightly.executors import ray_outcomes, thread_outcomes
from persona_agent.nightly.jobs import NightlySummary, Status, UserJob, UserOutcome, plan, work
from persona_agent.runtime.erasures import unfinished
from persona_agent.runtime.progress import output, progress_bar, wall_seconds
from persona_agent.runtime.store import Store
from persona_agent.settings import Settings

log = logging.getLogger(__name__)


class NightlyLocked(RuntimeError):
    pass


class PublishFailed(RuntimeError):
    """A worker's registry writes failed (its message names the error it met there)."""


def run_nightly(settings: Settings, task: Task, lm: dspy.LM | None = None, *, console: Console | None = None,
                executor: str = "thread") -> NightlySummary:
    """executor: "thread" (this process) or "ray" (a Ray cluster: RAY_ADDRESS, or a local one).
    Either way at most `settings.workers` users are in flight. This process writes the state rows;
    the registry is written by its commit processes, or by the Ray workers where the tracking
    store takes many writers (a tracking server). The persistent store is opened only under the
    lock, and its memory only while planning."""
    if executor not in ("thread", "ray"):
        raise ValueError(f"executor must be 'thread' or 'ray', not {executor!r}")
    if executor == "ray" and (settings.max_calls or settings.max_calls_per_user):
        raise ValueError("LM-call budgets are enforced with --executor thread only")
    console = console or Console(file=sys.stderr)
    settings.store.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(settings.nightly_lock))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise NightlyLocked(f"another nightly run holds {lock.lock_file}; refusing to start a second one "
                            "on the same store") from None
    try:
        return _run(settings, task, workers=settings.workers, lm=lm, console=console, executor=executor)
    finally:
        lock.release()


def _run(settings: Settings, task: Task, *, workers: int, lm: dspy.LM | None, console: Console,
         executor: str) -> NightlySummary:
    started = time.perf_counter()
    lm = lm or build_lm(settings.lm)
    adapter = dspy.settings.adapter or adapter_for(lm)
    states, summary, stop = StateStore.of(settings, task.key), NightlySummary(), threading.Event()
    gate = Gate(stop, settings.max_calls_per_user, settings.max_calls)
    with stop_on_signals(stop, summary, console), first_callback_of(lm, gate):
        with Store.open(settings, memory="persistent", writes=True) as store:
            planning, planning_cpu = time.perf_counter(), time.thread_time()
            jobs, summary.unchanged, summary.failed, summary.untouched = plan(
                store.memory, states, store.registry(task), full=settings.plan_all)
            if journal := unfinished(settings.store):  # half forgotten: not aligned again until `forget` finishes
                # (and a history the erase shrank is no damage to restore from a backup)
                erasing = {u for u in [*(j.user_id for j in jobs), *summary.failed] if journal.get(u)}
                jobs = [j for j in jobs if j.user_id not in erasing]
                summary.failed.update({u: f"an erase of this user did not finish: `persona-agent forget "
                                          f"{shlex.quote(u)}` finishes it; not aligned" for u in erasing})
            summary.driver_seconds += time.perf_counter() - planning
            summary.driver_cpu_seconds += time.thread_time() - planning_cpu
        # workers get each user's items in the job; the memory is free again for other processes

        def in_budget(job):  # a thread's user: the night's stop and LM-call budgets apply
            if stop.is_set():
                raise Stopped
            if gate.spent.is_set():
                return UserOutcome(job.user_id, job.fingerprint, Status.DEFERRED,
                                   error=f"the night's budget of {gate.per_night} LM calls was spent")
            token = user_calls.set([0])
            try:
                return work(job, task, settings, lm=lm, adapter=adapter)  # the commit process publishes
            except Deferred as why:  # cut off mid-way: nothing of it is committed, its calls are counted
                return UserOutcome(job.user_id, job.fingerprint, Status.DEFERRED, error=str(why),
                                   lm_calls=user_calls.get()[0])
            finally:
                user_calls.reset(token)

        # The users (threads) or the actors (Ray: each builds its LM) start now; the MLflow run and
        # the commit process (seconds: a spawned Python importing MLflow) are set up meanwhile.
        outcomes, shutdown = (ray_outcomes(jobs, task, settings, workers=workers, stop=stop) if executor == "ray"
                              else thread_outcomes(jobs, in_budget, workers))
        aborted = False
        try:
            _record(settings, task, outcomes, executor=executor, workers=workers, jobs=jobs, states=states,
                    summary=summary, started=started, console=console, lm=lm)
        except KeyboardInterrupt:  # a second Ctrl-C: no waiting for the users in flight
            aborted = True
            raise
        finally:
            shutdown(wait=not aborted)
    return summary


def _record(settings: Settings, task: Task, outcomes, *, executor: str, workers: int, jobs: list[UserJob],
            states: StateStore, summary: NightlySummary, started: float, console: Console, lm: dspy.LM) -> None:
    """Commit each outcome as it arrives, and log the night to MLflow."""
    # a night is a run that finished and aligned someone: a killed run, or one with nothing new,
    # is logged (as the next night's number) but does not move the count
    nights = [r for r in mlflow.search_runs(filter_string=f"tags.nightly_task = '{task.key}'", output_format="list")
              if r.info.status == "FINISHED"
              and r.data.metrics.get("users_aligned", 0) + r.data.metrics.get("users_rejected", 0) > 0]
    summary.night = 1 + len(nights)
    name = f"nightly-{task.key}-night{summary.night}-{time.strftime('%Y-%m-%d')}"
    with mlflow.start_run(run_name=name, tags={**tracking.owner_tags("nightly"), "nightly_task": task.key,
                                               "night": str(summary.night)}) as run, \
            _killed_if_aborted(), progress_bar(console, every=settings.progress_every) as progress:
        summary.run_id = run.info.run_id
        mlflow.log_params(tracking.run_params(
            settings, task.key, lm=lm, workers=workers, executor=executor, users_planned=len(jobs),
            score_max=settings.score_max, rollback_on_regression=settings.rollback_after,
            max_calls=settings.max_calls, max_calls_per_user=settings.max_calls_per_user))
        bar = progress.add_task("nightly", total=len(jobs))
        with Committer(settings.tracking_uri, task.key, states.path, run_id=run.info.run_id, night=summary.night,
                       min_free_mb=settings.min_free_mb, processes=settings.committers) as committer:
            # Tallied as commits finish (they finish in order), so a run holds the outcomes in
            # flight, not every user's: memory grows with workers, not users (bench/nightly_memory.py).
            pending, committed, deferred_calls = collections.deque(), [], {}
            marks = {job.user_id: job.mark for job in jobs}
            for outcome in outcomes(run.info.run_id, summary.night):
                tallying = time.perf_counter()  # the driver's own time: not the wait for the outcome
                tallying_cpu = time.thread_time()  # and its CPU: not the GIL waits for worker threads
                progress.update(bar, advance=1, description=f"{outcome.user_id}: {outcome.status}")
                if outcome.status is Status.DEFERRED:  # not committed; its LM calls were made, and count
                    summary.deferred[outcome.user_id] = outcome.error
                    summary.lm_calls += outcome.lm_calls
                    deferred_calls[outcome.user_id] = outcome.lm_calls
                    continue
                outcome.mark = marks[outcome.user_id]  # the change it consumes, recorded with its state
                if outcome.published is not None:  # its worker wrote the registry: the state row is ours
                    committed.append(_tally(summary, outcome, _record_state(states, outcome)))
                    summary.driver_seconds += time.perf_counter() - tallying
                    summary.driver_cpu_seconds += time.thread_time() - tallying_cpu
                    continue
                pending.append(committer.submit(outcome))
                while pending and pending[0].done():
                    sent = pending.popleft()
                    committed.append(_tally(summary, sent.outcome, committer.result(sent)))
                summary.driver_seconds += time.perf_counter() - tallying
                summary.driver_cpu_seconds += time.thread_time() - tallying_cpu
            while pending:
                sent = pending.popleft()
                committed.append(_tally(summary, sent.outcome, committer.result(sent)))
            rows = [{"user_id": user, "status": Status.FAILED, "error": error} for user, error in summary.failed.items()]
            rows += [{"user_id": user, "status": Status.DEFERRED, "lm_calls": deferred_calls.get(user, 0), "error": why}
                     for user, why in summary.deferred.items()]
            rows += committed
            _link_user_traces(committed, run.info.run_id)
        done = {row["user_id"] for row in rows}  # failed, deferred or committed
        summary.interrupted = [job.user_id for job in jobs if job.user_id not in done]
        rows += [{"user_id": user, "status": Status.INTERRUPTED} for user in summary.interrupted]
        summary.seconds = wall_seconds(started)
        mlflow.log_metrics(summary.counts())
        _log_series(nights, summary.quality(task), summary.night)
        if summary.scored:
            mlflow.log_table(_prequential_rows(summary, task), "prequential.json")
        columns = ["user_id", "status", "version", "lm_calls", "cached_calls", "tokens", "fallbacks", "error", "worker"]
        mlflow.log_text(pd.DataFrame(rows, columns=columns).to_csv(index=False), "users.csv")
        if summary.stopped_by:
            mlflow.set_tag("stopped_by", summary.stopped_by)


@contextlib.contextmanager
def _killed_if_aborted():
    """A second Ctrl-C ends the night's run KILLED (what happened), not FAILED (MLflow's default for
    an exception): the users it committed stand, the others are left for the next run."""
    try:
        yield
    except KeyboardInterrupt:
        mlflow.set_tag("stopped_by", "SIGINT twice (aborted)")
        mlflow.end_run("KILLED")
        raise


def _log_series(nights: list, tonight: dict[str, float], night: int) -> None:
    """Tonight's prequential scores at step `night`, and every earlier night's at theirs: each
    night's run then draws the whole series as a line in the MLflow UI, not a lone dot."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    series = [Metric(k, v, now, int(earlier.data.tags.get("night", "0") or 0))
              for earlier in nights for k, v in earlier.data.metrics.items() if k.startswith("prequential_")]
    series = [m for m in series if m.step] + [Metric(k, v, now, night) for k, v in tonight.items()]
    run_id, client = mlflow.active_run().info.run_id, mlflow.MlflowClient()
    for i in range(0, len(series), 1000):  # one request per 1,000 points (MLflow's batch limit), not per night
        client.log_batch(run_id, metrics=series[i:i + 1000])


def _record_state(states, outcome):
    """Marks a user whose worker published them done; their production version, or the error."""
    published = outcome.published
    if published.error:
        return PublishFailed(published.error)
    try:
        if published.state is not None:
            states.put(outcome.user_id, published.state, seen=outcome.mark)
    except Exception as err:  # e.g. a full disk: the user is redone next night, deduplicated
        return err
    return published.version


def _tally(summary: NightlySummary, outcome, version) -> dict:
    if isinstance(version, BaseException):  # the user keeps their persona and is retried next run
        why = str(version) if isinstance(version, PublishFailed) else f"{type(version).__name__}: {str(version)[:300]}"
        outcome.status, outcome.error = Status.FAILED, f"commit failed: {why}"
        version = None
    {Status.ALIGNED: summary.aligned, Status.REJECTED: summary.rejected}.get(outcome.status, []).append(outcome.user_id)
    if outcome.status is Status.ROLLED_BACK:
        summary.rolled_back[outcome.user_id] = (outcome.prequential.version, outcome.rollback_to)
    if outcome.status is Status.FAILED:
        summary.failed[outcome.user_id] = outcome.error
    summary.lm_calls += outcome.lm_calls
    summary.tokens += outcome.tokens
    summary.fallbacks += outcome.fallbacks
    if outcome.prequential is not None and outcome.status is not Status.FAILED:
        summary.scored[outcome.user_id] = outcome.prequential
    return {"user_id": outcome.user_id, "status": outcome.status, "version": version, "lm_calls": outcome.lm_calls,
            "cached_calls": outcome.cache_hits, "tokens": outcome.tokens, "fallbacks": outcome.fallbacks,
            "error": outcome.error, "worker": outcome.worker, "trace_id": outcome.trace_id}


def _link_user_traces(rows: list[dict], run_id: str) -> None:
    """Each user's trace on the night's Traces tab, tagged with the version the night left in production."""
    traced = [row for row in rows if row.get("trace_id")]
    if traced:
        tracking.link_traces([row["trace_id"] for row in traced], run_id)
        for row in traced:
            tracking.tag_trace(row["trace_id"], status=row["status"], production_version=row["version"])


def _prequential_rows(summary: NightlySummary, task: Task) -> pd.DataFrame:
    """One row per scored interaction: the failing ones are a filter away in the MLflow UI."""
    return pd.DataFrame([
        {"night": summary.night, "user_id": user, "item_id": item, "gold": gold, "production": ours,
         "non_personalized": theirs, "production_score": task.example_score(gold, ours),
         "non_personalized_score": task.example_score(gold, theirs)}
        for user, p in summary.scored.items()
        for item, gold, ours, theirs in zip(p.item_ids, p.golds, p.production, p.non_personalized)])


def print_summary(summary: NightlySummary, console: Console | None = None, task: Task | None = None) -> None:
    console = console or output()
    quality = summary.quality(task) if task is not None else {}
    if quality.get("prequential_items"):
        metric = task.metric_names[0]
        console.print(f"new interactions scored: {quality['prequential_items']}; production persona {metric} "
                      f"{quality[f'prequential_production_{metric}']:.3f}, non-personalized "
                      f"{quality[f'prequential_non_personalized_{metric}']:.3f} "
                      f"({quality['prequential_lm_calls']} LM calls)")
    c = summary.counts()
    console.print(f"aligned {c['users_aligned']}, rejected {c['users_rejected']}, unchanged {c['users_unchanged']}, "
                  f"failed {c['users_failed']}; {c['lm_calls']} LM calls, {c['tokens']} tokens, "
                  f"{c['lm_fallbacks']} unusable LM answers replaced, {c['wall_seconds']:.1f} s")
    for user_id, error in summary.failed.items():
        console.print(f"  failed: {user_id}: {error}")
    if summary.deferred:
        console.print(f"deferred to the next night (budget): {', '.join(summary.deferred)}")
    for user_id, (before, after) in summary.rolled_back.items():
        console.print(f"  rolled back: {user_id}: production v{before} scored below its recent nights; now v{after}")
    if summary.run_id:
        console.print(f"MLflow run {summary.run_id} (night {summary.night}); {tracking.ui_hint()}")
    if summary.stopped_by:
        console.print(f"stopped by {summary.stopped_by}: {len(summary.interrupted)} users left for the next run")
