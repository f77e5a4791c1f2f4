"""Where the nightly's users are aligned: threads in this process, or actors on a Ray cluster.
Each returns (outcomes(run_id, night) as they finish, shutdown)."""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor, as_completed

from persona_agent.adapters.llm import adapter_for, build_lm
from persona_agent.data.tasks import Task
from persona_agent.nightly.control import Stopped
from persona_agent.nightly.jobs import Published, Status, UserJob, UserOutcome, work
from persona_agent.settings import Settings, sqlite_file


def thread_outcomes(jobs, work, workers):
    """Starts every job now; returns (outcomes(run_id, night): as they finish, shutdown). Shutdown
    cancels the jobs not started and waits for those running (an error on the way leaves no LM
    calls behind), unless told not to (an abort). The driver commits what they return."""
    pool = ThreadPoolExecutor(max_workers=max(1, workers))
    futures = [pool.submit(work, job) for job in jobs]

    def outcomes(run_id: str, night: int):
        waiting = as_completed(futures[:])  # it drops each future it yields: an outcome is freed once handled
        futures.clear()
        for future in waiting:
            try:
                yield future.result()
            except Stopped:  # not started, or stopped at an LM call: left for the next run
                pass

    return outcomes, lambda wait=True: pool.shutdown(wait=wait, cancel_futures=True)


class _RayAligner:
    """A Ray actor: builds the LM once, then aligns the users it is sent, several at a time on
    threads (the work waits on the LLM). Jobs carry each user's memory items, which the driver
    read to plan them, so the actor needs no access to the store. With `tracking_uri` (a tracking
    server or database that takes many writers) it also publishes each user's revisions there
    itself (`jobs.publish`): the registry writes, most of a commit, run on the cluster in
    parallel, and the driver writes only the state row."""

    def __init__(self, task_key: str, settings: Settings, tracking_uri: str | None):
        import mlflow
        import ray

        from persona_agent.adapters.registry import PersonaRegistry
        from persona_agent.data.tasks import get_task
        from persona_agent.settings import offline_environment

        offline_environment()
        self.task, self.settings, self.lm = get_task(task_key), settings, build_lm(settings.lm)
        self.registry = None
        if tracking_uri is not None:
            mlflow.set_tracking_uri(tracking_uri)
            self.registry = PersonaRegistry(self.task, tracking_uri)
        self.where = f"{ray.get_runtime_context().get_node_id()[:12]}/{os.getpid()}"

    def align(self, job: UserJob, run_id: str, night: int) -> UserOutcome:
        outcome = work(job, self.task, self.settings, lm=self.lm, adapter=adapter_for(self.lm),
                       registry=self.registry, run_id=run_id, night=night)
        outcome.worker = self.where
        return outcome


def ray_outcomes(jobs, task: Task, settings: Settings, *, workers: int, stop: threading.Event):
    """Starts the actors now (each builds its LM while the driver opens the night's run); returns
    (outcomes(run_id, night): as they finish, shutdown). Shutdown kills the actors: on a stop, the
    users in flight go with them. A killed actor is restarted once; the users it held fail, named,
    and are redone next night (a half-published user's versions are found by their tags)."""
    import math

    import ray

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"), include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
    # A process per CPU (at most), each running its share of the `workers` users on threads:
    # a process per user would spend more on starting Python and DSPy than on the work.
    actors = max(1, min(workers, len(jobs), int(ray.cluster_resources().get("CPU", 1))))
    per_actor = math.ceil(max(1, workers) / actors)
    # SQLite takes one writer: there the driver's commit process publishes; anything else the workers do
    uri = settings.tracking_uri
    publishes = None if sqlite_file(uri) is not None else uri
    aligner = ray.remote(num_cpus=0.5, max_concurrency=per_actor, max_restarts=1,
                         scheduling_strategy="SPREAD")(_RayAligner)  # across nodes, not packed onto one
    pool = [aligner.remote(task.key, settings, publishes) for _ in range(actors)]
    pending, queue, load = {}, list(jobs), {i: 0 for i in range(actors)}

    def outcomes(run_id: str, night: int):
        def submit():
            while queue and len(pending) < actors * per_actor and not stop.is_set():
                i = min(load, key=load.get)
                load[i] += 1
                job = queue.pop(0)
                pending[pool[i].align.remote(job, run_id, night)] = (i, job)

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
                why = f"{type(err).__name__}: {str(err)[:300]}"
                yield UserOutcome(job.user_id, job.fingerprint, Status.FAILED, error=why,
                                  published=Published(job.version) if publishes else None)

    return outcomes, lambda wait=True: [ray.kill(actor) for actor in pool]
