"""Where the nightly's users are aligned: threads in this process, or actors on a Ray cluster.
Each returns (outcomes as they finish, shutdown)."""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor, as_completed

import dspy

from persona_agent.data.tasks import Task
from persona_agent.nightly.control import Stopped
from persona_agent.nightly.jobs import UserOutcome, align_job
from persona_agent.runtime.llm import adapter_for, build_lm
from persona_agent.runtime.settings import Settings


def thread_outcomes(jobs, work, workers):
    """Starts every job now; returns (outcomes as they finish, shutdown). Shutdown cancels the
    jobs not started and waits for those running (an error on the way leaves no LM calls behind),
    unless told not to (an abort)."""
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

    return outcomes(), lambda wait=True: pool.shutdown(wait=wait, cancel_futures=True)


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


def ray_outcomes(jobs, task: Task, settings: Settings, workers: int, stop: threading.Event):
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
    return outcomes(), lambda wait=True: [ray.kill(actor) for actor in pool]
