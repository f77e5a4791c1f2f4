"""The evaluation harness: every method on every user's queries, scored the official way.

Users run in a bounded thread pool (each worker opens its own DSPy context and cost meter);
memory is written once up front. Answers are pooled over users per method and scored with the
task's metrics; queries without gold (a LaMP test split) still get predictions.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import Callable

import dspy

from persona_agent.config import Settings
from persona_agent.pipelines.memory import EpisodicMemory
from persona_agent.pipelines.methods import METHODS, SETUP, UserContext
from persona_agent.pipelines.personalize import answer_or_none, remember
from persona_agent.usage import Cost, metered

from .data import UserData
from .tasks import Task

log = logging.getLogger(__name__)


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
             adapter: dspy.Adapter, memory: EpisodicMemory, workers: int = 2,
             on_progress: Callable[[str], None] | None = None) -> list[MethodResult]:
    for user in users:  # writes stay on this thread; workers only read
        remember(memory, user)

    def one_user(user: UserData) -> _UserRun:
        with dspy.context(lm=lm, adapter=adapter):
            return _run_user(UserContext(user, memory, settings), methods, on_progress)

    runs: list[_UserRun] = []
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        futures = {pool.submit(one_user, u): u for u in users}
        for future in as_completed(futures):
            runs.append(future.result())
    golds = {q.id: q.gold for u in users for q in u.queries}
    return [_pool(task, m, runs, golds) for m in methods]


def _run_user(ctx: UserContext, methods: list[str], on_progress) -> _UserRun:
    out = _UserRun()
    for method in methods:
        answers, failures = {}, 0
        try:  # setup (profile, alignment) is metered apart, inside UserContext
            program = METHODS[method](ctx)
        except Exception as err:  # a method that cannot be set up for this user scores as wrong
            log.warning("user %s, %s: setup failed: %s", ctx.user.user_id, method, str(err)[:200])
            program = None
        started = time.perf_counter()
        with metered() as cost:
            for q in ctx.user.queries:
                answers[q.id] = (answer_or_none(program, q.input, f"user {ctx.user.user_id}, {method}, query {q.id}")
                                 if program is not None else None)
                failures += answers[q.id] is None
        out.answers[method], out.cost[method], out.failures[method] = answers, cost, failures
        out.seconds[method] = time.perf_counter() - started
        out.setup[method] = sum(ctx.setup_cost[s].lm_calls for s in SETUP.get(method, ()) if s in ctx.setup_cost)
        if on_progress:
            on_progress(f"{ctx.user.user_id}: {method}")
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
