"""`persona-agent nightly`: re-align every user whose history changed since the last run.

One run per store at a time (a lock file); users run on a bounded thread pool; every result is
committed by this process as it arrives, so a crash loses at most the users in flight, and a
rerun finishes them (see `nightly_jobs`).
"""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor, as_completed

import dspy
import mlflow
import pandas as pd
from filelock import FileLock, Timeout
from rich.console import Console

from . import tracking
from .eval.tasks import Task
from .llm import adapter_for, build_lm
from .nightly_jobs import NightlySummary, StateStore, UserOutcome, align_job, commit, plan, state_root
from .progress import progress_bar
from .registry import PersonaRegistry
from .settings import Settings
from .store import Store


class NightlyLocked(RuntimeError):
    pass


def run_nightly(settings: Settings, task: Task, lm: dspy.LM | None = None, console: Console | None = None,
                executor: str = "thread") -> NightlySummary:
    """executor: "thread" (this process) or "ray" (a Ray cluster: RAY_ADDRESS, or a local one).
    Either way at most `settings.workers` users are in flight, and this process does every write.
    The persistent store is opened only under the lock, and its memory only while planning."""
    if executor not in ("thread", "ray"):
        raise ValueError(f"executor must be 'thread' or 'ray', not {executor!r}")
    console = console or Console(stderr=True)
    settings.store.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(settings.store / "nightly.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise NightlyLocked(f"another nightly run holds {lock.lock_file}; refusing to start a second one "
                            "on the same store") from None
    try:
        return _run(settings, task, settings.workers, lm, console, executor)
    finally:
        lock.release()


def _run(settings, task, workers, lm, console, executor) -> NightlySummary:
    started = time.perf_counter()
    lm = lm or build_lm(settings.lm)
    adapter = dspy.settings.adapter or adapter_for(lm)
    states, summary = StateStore(state_root(settings, task)), NightlySummary()
    with Store.open(settings, memory="persistent") as store:
        jobs, summary.unchanged, summary.failed = plan(store.memory, states, store.registry(task))
    # workers get each user's items in the job; the memory is free again for other processes

    def work(job):
        with dspy.context(lm=lm, adapter=adapter):
            return align_job(job, task, settings)

    outcomes = (_ray_outcomes(jobs, task, settings, workers) if executor == "ray"
                else _thread_outcomes(jobs, work, workers))
    with mlflow.start_run(run_name=f"nightly-{task.key}", tags=tracking.owner_tags()) as run, \
            progress_bar(console) as progress:
        mlflow.log_params({"task": task.key, "workers": workers, "executor": executor, "lm": settings.lm.model,
                           "users_planned": len(jobs), "batch_size": settings.batch_size, "iterations": settings.iterations})
        bar = progress.add_task("nightly", total=len(jobs))
        # One committer process does every registry and state write, in arrival order: MLflow's
        # SQLAlchemy writes are CPU work that would otherwise share this interpreter with the workers.
        with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"),
                                 initializer=_committer_init, initargs=(settings.tracking_uri, os.getpid())) as committer:
            pending = []
            for outcome in outcomes:
                pending.append((outcome, committer.submit(_commit, outcome, task.key, str(states.root), run.info.run_id)))
                progress.update(bar, advance=1, description=f"{outcome.user_id}: {outcome.status}")
            rows = [{"user_id": user, "status": "failed", "error": error} for user, error in summary.failed.items()]
            rows += [_tally(summary, outcome, future) for outcome, future in pending]
        summary.seconds = time.perf_counter() - started
        mlflow.log_metrics(summary.counts())
        mlflow.log_text(pd.DataFrame(rows, columns=["user_id", "status", "version", "lm_calls", "tokens", "fallbacks", "error"])
                        .to_csv(index=False), "users.csv")
    return summary


def _committer_init(tracking_uri: str, parent: int) -> None:
    mlflow.set_tracking_uri(tracking_uri)
    threading.Thread(target=_exit_when_orphaned, args=(parent,), daemon=True).start()


def _exit_when_orphaned(parent: int) -> None:
    """A pool worker outlives a killed parent, waiting for work forever; this one exits instead
    (a commit it was in the middle of is redone, deduplicated, by the next run)."""
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(1)


def _commit(outcome, task_key: str, state_dir: str, run_id: str):
    from pathlib import Path

    from .eval.tasks import get_task

    task = get_task(task_key)
    return commit(outcome, task, PersonaRegistry(task), StateStore(Path(state_dir)), run_id)


def _tally(summary: NightlySummary, outcome, future) -> dict:
    try:
        version = future.result()
    except Exception as err:  # the user keeps their persona and is retried next run
        outcome.status, outcome.error, version = "failed", f"commit failed: {str(err)[:300]}", None
    {"aligned": summary.aligned, "rejected": summary.rejected}.get(outcome.status, []).append(outcome.user_id)
    if outcome.status == "failed":
        summary.failed[outcome.user_id] = outcome.error
    summary.lm_calls += outcome.lm_calls
    summary.tokens += outcome.tokens
    summary.fallbacks += outcome.fallbacks
    return {"user_id": outcome.user_id, "status": outcome.status, "version": version, "lm_calls": outcome.lm_calls,
            "tokens": outcome.tokens, "fallbacks": outcome.fallbacks, "error": outcome.error}


def _thread_outcomes(jobs, work, workers):
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for future in as_completed([pool.submit(work, job) for job in jobs]):
            yield future.result()


class _RayAligner:
    """A Ray actor: builds the LM once, then aligns the users it is sent, several at a time on
    threads (the work waits on the LLM). Jobs carry each user's memory items, so the actor needs
    no access to the store (embedded Qdrant is single-process)."""

    def __init__(self, task_key: str, settings: Settings):
        from .eval.tasks import get_task
        from .settings import offline_environment

        offline_environment()
        self.task, self.settings, self.lm = get_task(task_key), settings, build_lm(settings.lm)

    def align(self, job):
        with dspy.context(lm=self.lm, adapter=adapter_for(self.lm)):
            return align_job(job, self.task, self.settings)


def _ray_outcomes(jobs, task: Task, settings: Settings, workers: int):
    import math

    import ray

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"), include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
    # A process per CPU (at most), each running its share of the `workers` users on threads:
    # a process per user would spend more on starting Python and DSPy than on the work.
    actors = max(1, min(workers, len(jobs), int(ray.cluster_resources().get("CPU", 1))))
    per_actor = math.ceil(max(1, workers) / actors)
    aligner = ray.remote(num_cpus=0.5, max_concurrency=per_actor, max_restarts=1)(_RayAligner)
    pool = [aligner.remote(task.key, settings) for _ in range(actors)]
    pending, queue, load = {}, list(jobs), {i: 0 for i in range(actors)}
    while queue or pending:
        while queue and len(pending) < actors * per_actor:
            i = min(load, key=load.get)
            load[i] += 1
            job = queue.pop(0)
            pending[pool[i].align.remote(job)] = (i, job)
        [done], _ = ray.wait(list(pending), num_returns=1)
        i, job = pending.pop(done)
        load[i] -= 1
        try:
            yield ray.get(done)
        except Exception as err:  # a lost worker or actor: this user is retried next run
            yield UserOutcome(job.user_id, job.fingerprint, "failed", error=f"{type(err).__name__}: {str(err)[:300]}")
    for actor in pool:
        ray.kill(actor)


def print_summary(summary: NightlySummary, console: Console | None = None) -> None:
    console = console or Console()
    c = summary.counts()
    console.print(f"aligned {c['users_aligned']}, rejected {c['users_rejected']}, unchanged {c['users_unchanged']}, "
                  f"failed {c['users_failed']}; {c['lm_calls']} LM calls, {c['tokens']} tokens, "
                  f"{c['lm_fallbacks']} unusable LM answers replaced, {c['wall_seconds']:.1f} s")
    for user_id, error in summary.failed.items():
        console.print(f"  failed: {user_id}: {error}")
