"""`persona-agent nightly`: re-align every user whose history changed since the last run.

One run per store at a time (a lock file); users run on a bounded thread pool; every result is
committed as it arrives, so a crash loses at most the users in flight, and a rerun finishes them
(see `nightly_jobs`). SIGINT or SIGTERM stops the run: no user starts, no LM call is made after
it, the users that finished are committed, the others are left for the next run.
"""

from __future__ import annotations

import collections
import contextlib
import contextvars
import logging
import multiprocessing
import os
import signal
import threading
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool

import dspy
import mlflow
import pandas as pd
from dspy.utils.callback import BaseCallback
from filelock import FileLock, Timeout
from rich.console import Console

from persona_agent.data.tasks import Task
from persona_agent.nightly.jobs import NightlySummary, StateStore, UserOutcome, align_job, commit, plan, state_root
from persona_agent.runtime import tracking
from persona_agent.runtime.llm import adapter_for, build_lm
from persona_agent.runtime.progress import progress_bar
from persona_agent.runtime.registry import PersonaRegistry
from persona_agent.runtime.settings import Settings
from persona_agent.runtime.store import Store

log = logging.getLogger(__name__)


class NightlyLocked(RuntimeError):
    pass


class Stopped(BaseException):
    """Raised in a worker at its next LM call once the run was told to stop. A BaseException, so
    no `except Exception` on the way (DSPy's own, or a counted fallback) takes it for a bad answer."""


class Deferred(Stopped):
    """Raised in a worker at an LM call past a budget: the user is not committed (never half
    aligned), keeps their persona, and is aligned on a later night."""


# LM calls of the user a worker thread is aligning (a one-item list, set per job)
_user_calls: contextvars.ContextVar[list[int] | None] = contextvars.ContextVar("user_calls", default=None)


class _Gate(BaseCallback):
    """First callback on every LM call of the workers: refuses it once the run was told to stop,
    or when it would pass a budget (`max_calls_per_user`, `max_calls` per night; 0: none).
    Calls DSPy's cache answers count too: whether one will is known only after it is made."""

    def __init__(self, stop: threading.Event, per_user: int, per_night: int):
        self.stop, self.per_user, self.per_night = stop, per_user, per_night
        self.calls, self.spent, self._lock = 0, threading.Event(), threading.Lock()

    def on_lm_start(self, call_id, instance, inputs):
        if self.stop.is_set():
            raise Stopped
        with self._lock:
            if self.per_night and self.calls >= self.per_night:
                self.spent.set()
                raise Deferred(f"the night's budget of {self.per_night} LM calls was spent")
            self.calls += 1
        user = _user_calls.get()
        if user is not None:
            user[0] += 1
            if self.per_user and user[0] > self.per_user:
                raise Deferred(f"needs more than the {self.per_user} LM calls a user may use per night")


@contextlib.contextmanager
def _first_callback_of(lm: dspy.LM, callback: BaseCallback):
    """The LM's own first callback for the run (before the meters' counter, so a refused call is
    not counted): on the LM, DSPy runs callbacks once per LM call; in `dspy.settings` it would
    run them around every module and adapter call as well."""
    lm.callbacks = [callback, *(lm.callbacks or [])]
    try:
        yield
    finally:
        lm.callbacks = [c for c in lm.callbacks if c is not callback]


@contextlib.contextmanager
def _stop_on_signals(stop: threading.Event, summary: NightlySummary, console: Console):
    """The first SIGINT/SIGTERM asks the run to stop; a second SIGINT aborts at once (the store
    stays consistent either way: see `nightly_jobs`). Only the main thread can take signals."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handle(signum, frame):
        summary.stopped_by = signal.Signals(signum).name
        stop.set()
        signal.signal(signal.SIGINT, signal.default_int_handler)
        console.print(f"{summary.stopped_by}: stopping; committing the users that finished "
                      "(Ctrl-C again to abort at once)")

    previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run_nightly(settings: Settings, task: Task, lm: dspy.LM | None = None, console: Console | None = None,
                executor: str = "thread") -> NightlySummary:
    """executor: "thread" (this process) or "ray" (a Ray cluster: RAY_ADDRESS, or a local one).
    Either way at most `settings.workers` users are in flight, and this process does every write.
    The persistent store is opened only under the lock, and its memory only while planning."""
    if executor not in ("thread", "ray"):
        raise ValueError(f"executor must be 'thread' or 'ray', not {executor!r}")
    if executor == "ray" and (settings.max_calls or settings.max_calls_per_user):
        raise ValueError("LM-call budgets are enforced with --executor thread only")
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
    states, summary, stop = StateStore(state_root(settings, task)), NightlySummary(), threading.Event()
    gate = _Gate(stop, settings.max_calls_per_user, settings.max_calls)
    with _stop_on_signals(stop, summary, console), _first_callback_of(lm, gate):
        with Store.open(settings, memory="persistent") as store:
            jobs, summary.unchanged, summary.failed = plan(store.memory, states, store.registry(task))
        # workers get each user's items in the job; the memory is free again for other processes

        def work(job):
            if stop.is_set():
                raise Stopped
            if gate.spent.is_set():
                return UserOutcome(job.user_id, job.fingerprint, "deferred",
                                   error=f"the night's budget of {gate.per_night} LM calls was spent")
            token = _user_calls.set([0])
            try:
                with dspy.context(lm=lm, adapter=adapter):
                    return align_job(job, task, settings)
            except Deferred as why:  # cut off mid-way: nothing of it is committed
                return UserOutcome(job.user_id, job.fingerprint, "deferred", error=str(why))
            finally:
                _user_calls.reset(token)

        # The users start now; the MLflow run and the commit process (seconds: a spawned Python
        # importing MLflow) are set up while they work.
        outcomes, shutdown = (_ray_outcomes(jobs, task, settings, workers, stop) if executor == "ray"
                              else _thread_outcomes(jobs, work, workers))
        try:
            _record(settings, task, executor, workers, jobs, outcomes, states, summary, started, console)
        finally:
            shutdown()
    return summary


def _record(settings, task, executor, workers, jobs, outcomes, states, summary, started, console) -> None:
    """Commit each outcome as it arrives, and log the night to MLflow."""
    summary.night = 1 + len(mlflow.search_runs(filter_string=f"tags.nightly_task = '{task.key}'",
                                               output_format="list"))
    with mlflow.start_run(run_name=f"nightly-{task.key}", tags={**tracking.owner_tags(), "nightly_task": task.key,
                                                                 "night": str(summary.night)}) as run, \
            progress_bar(console) as progress:
        mlflow.log_params(tracking.run_params(
            settings, task.key, workers=workers, executor=executor, users_planned=len(jobs),
            score_max=settings.score_max, rollback_after=settings.rollback_after,
            max_calls=settings.max_calls, max_calls_per_user=settings.max_calls_per_user))
        bar = progress.add_task("nightly", total=len(jobs))
        with _Committer(settings.tracking_uri, task.key, states.root, run.info.run_id, summary.night) as committer:
            # Tallied as commits finish (they finish in order), so a run holds the outcomes in
            # flight, not every user's: memory grows with workers, not users (bench/nightly_memory.py).
            pending, committed = collections.deque(), []
            for outcome in outcomes:
                progress.update(bar, advance=1, description=f"{outcome.user_id}: {outcome.status}")
                if outcome.status == "deferred":
                    summary.deferred[outcome.user_id] = outcome.error
                    continue
                pending.append((outcome, committer.submit(outcome)))
                while pending and pending[0][1][1].done():
                    committed.append(_tally(summary, *_committed(committer, pending.popleft())))
            while pending:
                committed.append(_tally(summary, *_committed(committer, pending.popleft())))
            rows = [{"user_id": user, "status": "failed", "error": error} for user, error in summary.failed.items()]
            rows += [{"user_id": user, "status": "deferred", "error": why} for user, why in summary.deferred.items()]
            rows += committed
        done = {row["user_id"] for row in rows}  # failed, deferred or committed
        summary.interrupted = [job.user_id for job in jobs if job.user_id not in done]
        rows += [{"user_id": user, "status": "interrupted"} for user in summary.interrupted]
        summary.seconds = time.perf_counter() - started
        mlflow.log_metrics(summary.counts())
        mlflow.log_metrics(summary.quality(task), step=summary.night)
        if summary.scored:
            mlflow.log_table(_prequential_rows(summary, task), "prequential.json")
        mlflow.log_text(pd.DataFrame(rows, columns=["user_id", "status", "version", "lm_calls", "tokens",
                                                    "fallbacks", "error"]).to_csv(index=False), "users.csv")
        if summary.stopped_by:
            mlflow.set_tag("stopped_by", summary.stopped_by)


class _Committer:
    """One child process does every registry and state write, in arrival order: MLflow's
    SQLAlchemy writes are CPU work that would otherwise share this interpreter with the workers.

    A committer that dies (killed, out of memory) is replaced, up to `RESTARTS` times, and the
    commits it had not finished are sent again: a commit is idempotent (`nightly_jobs.commit`).
    Past that, the users not yet committed fail, named, and keep their personas."""

    RESTARTS = 3

    def __init__(self, tracking_uri: str, task_key: str, state_root, run_id: str, night: int):
        self.args, self.restarts, self.tracking_uri = (task_key, str(state_root), run_id, night), self.RESTARTS, tracking_uri
        self.pool = self._start()

    def _start(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_committer_init, initargs=(self.tracking_uri, os.getpid()))

    def _replace(self, broken: ProcessPoolExecutor) -> None:
        if self.pool is broken:  # the first of its pending commits to notice starts the next one
            if self.restarts <= 0:
                raise BrokenProcessPool("the commit process died too often; not restarting it")
            self.restarts -= 1
            log.warning("the commit process died; starting a new one (%d restarts left)", self.restarts)
            broken.shutdown(wait=False)
            self.pool = self._start()

    def submit(self, outcome):
        pool = self.pool
        try:
            return pool, pool.submit(_commit, outcome, *self.args)
        except BrokenProcessPool:
            self._replace(pool)
            return self.submit(outcome)

    def result(self, outcome, submitted):
        """The production version, or the exception the commit ended with."""
        pool, future = submitted
        try:
            return future.result()
        except BrokenProcessPool as err:
            try:
                self._replace(pool)
            except BrokenProcessPool:
                return err
            return self.result(outcome, self.submit(outcome))
        except Exception as err:
            return err

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.pool.shutdown(wait=True)


def _committer_init(tracking_uri: str, parent: int) -> None:
    # Ctrl-C reaches the whole process group: the parent decides when committing stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    mlflow.set_tracking_uri(tracking_uri)
    threading.Thread(target=_exit_when_orphaned, args=(parent,), daemon=True).start()


def _exit_when_orphaned(parent: int) -> None:
    """A pool worker outlives a killed parent, waiting for work forever; this one exits instead
    (a commit it was in the middle of is redone, deduplicated, by the next run)."""
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(1)


def _commit(outcome, task_key: str, state_dir: str, run_id: str, night: int):
    from pathlib import Path

    from persona_agent.data.tasks import get_task

    task = get_task(task_key)
    return commit(outcome, task, PersonaRegistry(task), StateStore(Path(state_dir)), run_id, night)


def _committed(committer: _Committer, entry) -> tuple:
    outcome, submitted = entry
    return outcome, committer.result(outcome, submitted)


def _tally(summary: NightlySummary, outcome, version) -> dict:
    if isinstance(version, BaseException):  # the user keeps their persona and is retried next run
        outcome.status, outcome.error = "failed", f"commit failed: {type(version).__name__}: {str(version)[:300]}"
        version = None
    {"aligned": summary.aligned, "rejected": summary.rejected}.get(outcome.status, []).append(outcome.user_id)
    if outcome.status == "rolled back":
        summary.rolled_back[outcome.user_id] = (outcome.prequential.version, outcome.rollback_to)
    if outcome.status == "failed":
        summary.failed[outcome.user_id] = outcome.error
    summary.lm_calls += outcome.lm_calls
    summary.tokens += outcome.tokens
    summary.fallbacks += outcome.fallbacks
    if outcome.prequential is not None and outcome.status != "failed":
        summary.scored[outcome.user_id] = outcome.prequential
    return {"user_id": outcome.user_id, "status": outcome.status, "version": version, "lm_calls": outcome.lm_calls,
            "tokens": outcome.tokens, "fallbacks": outcome.fallbacks, "error": outcome.error}


def _prequential_rows(summary: NightlySummary, task: Task) -> pd.DataFrame:
    """One row per scored interaction: the failing ones are a filter away in the MLflow UI."""
    return pd.DataFrame([
        {"night": summary.night, "user_id": user, "item_id": item, "gold": gold, "production": ours,
         "non_personalized": theirs, "production_score": task.example_score(gold, ours),
         "non_personalized_score": task.example_score(gold, theirs)}
        for user, p in summary.scored.items()
        for item, gold, ours, theirs in zip(p.item_ids, p.golds, p.production, p.non_personalized)])


def _thread_outcomes(jobs, work, workers):
    """Starts every job now; returns (outcomes as they finish, shutdown). Shutdown cancels the
    jobs not started and waits for those running (an error on the way leaves no LM calls behind)."""
    pool = ThreadPoolExecutor(max_workers=max(1, workers))
    futures = [pool.submit(work, job) for job in jobs]

    def outcomes():
        waiting = as_completed(futures[:])  # it drops each future it yields: an outcome is freed once handled
        futures.clear()
        for future in waiting:
            try:
                yield future.result()
            except Stopped:  # not started, or stopped at an LM call: left for the next run
                pass

    return outcomes(), lambda: pool.shutdown(wait=True, cancel_futures=True)


class _RayAligner:
    """A Ray actor: builds the LM once, then aligns the users it is sent, several at a time on
    threads (the work waits on the LLM). Jobs carry each user's memory items, so the actor needs
    no access to the store (embedded Qdrant is single-process)."""

    def __init__(self, task_key: str, settings: Settings):
        from persona_agent.data.tasks import get_task
        from persona_agent.runtime.settings import offline_environment

        offline_environment()
        self.task, self.settings, self.lm = get_task(task_key), settings, build_lm(settings.lm)

    def align(self, job):
        with dspy.context(lm=self.lm, adapter=adapter_for(self.lm)):
            return align_job(job, self.task, self.settings)


def _ray_outcomes(jobs, task: Task, settings: Settings, workers: int, stop: threading.Event):
    """Starts the actors and the first users now; returns (outcomes as they finish, shutdown).
    Shutdown kills the actors: on a stop, the users in flight go with them."""
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

    def submit():
        while queue and len(pending) < actors * per_actor and not stop.is_set():
            i = min(load, key=load.get)
            load[i] += 1
            job = queue.pop(0)
            pending[pool[i].align.remote(job)] = (i, job)

    def outcomes():
        while (queue or pending) and not stop.is_set():
            submit()
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=0.5)  # a timeout, to notice a stop
            if not ready:
                continue
            i, job = pending.pop(ready[0])
            load[i] -= 1
            try:
                yield ray.get(ready[0])
            except Exception as err:  # a lost worker or actor: this user is retried next run
                yield UserOutcome(job.user_id, job.fingerprint, "failed", error=f"{type(err).__name__}: {str(err)[:300]}")

    submit()
    return outcomes(), lambda: [ray.kill(actor) for actor in pool]


def print_summary(summary: NightlySummary, console: Console | None = None, task: Task | None = None) -> None:
    console = console or Console()
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
    if summary.stopped_by:
        console.print(f"stopped by {summary.stopped_by}: {len(summary.interrupted)} users left for the next run")
