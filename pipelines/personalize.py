"""Per-user steps of the pipeline: remember, profile, build the agent, score it.

Each function does one thing for one user, so commands (demo, eval, nightly) compose them and
run users in any order or in parallel.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from typing import Callable, TypeVar

import dspy
from dspy.utils.exceptions import is_retryable_lm_error

from persona_agent.eval.data import UserData
from persona_agent.eval.tasks import Task
from persona_agent.signatures import SummarizeProfile
from persona_agent.usage import count_fallback

from .agent import PersonaAgent
from .memory import EpisodicMemory, MemoryItem, UserMemory
from .persona import Persona, injection_problem, looks_degenerate

log = logging.getLogger(__name__)


def remember(memory: EpisodicMemory, user: UserData) -> int:
    """Write a user's whole profile to episodic memory (idempotent); returns items written."""
    task = user.task
    items = [MemoryItem(str(it["id"]), task.item_text(it), _response(task, it), it.get("date")) for it in user.profile]
    return memory.add(user.user_id, items)


def _response(task: Task, item: dict) -> str | None:
    r = task.item_response(item)
    return None if r is None else str(r).strip().lower()


def write_profile(user: UserData, n_items: int = 20) -> str:
    """Semantic memory: an LLM-written summary of the user's latest history."""
    task = user.task
    items = [MemoryItem(str(it["id"]), task.item_text(it), _response(task, it)) for it in user.profile]
    return summarize(task, items, n_items, user.user_id)


def summarize(task: Task, items: list[MemoryItem], n_items: int = 20, who: str = "?") -> str:
    """The profile from the latest `n_items` memories; "" (logged) when the LM writes nothing usable."""
    items = items[-n_items:]
    if not items:
        return ""
    history = "\n".join(f"- {it.text} -> {it.response}" if it.response is not None else f"- {it.text}" for it in items)
    profile = or_fallback(lambda: dspy.Predict(SummarizeProfile)(task=task.description, history=history).profile,
                          "", f"user {who}: profile summary")
    problem = "empty or degenerate text" if looks_degenerate(profile) else injection_problem(profile)
    if problem:
        if profile:  # (an empty one was counted as a fallback already)
            count_fallback()
        log.warning("user %s: the LM wrote no usable profile (%s); starting from an empty one", who, problem)
        return ""
    return profile


def trainset(user: UserData) -> list[dspy.Example]:
    """The user's past interactions as alignment examples, oldest first."""
    return [dspy.Example(query=i.input, answer=i.response, item_id=i.item_id).with_inputs("query")
            for i in user.interactions()]


def memory_trainset(task: Task, items: list[MemoryItem]) -> list[dspy.Example]:
    """The same examples from memory items (what the nightly job has)."""
    return [dspy.Example(query=task.make_input(it.text, task.labels), answer=it.response, item_id=it.item_id)
            .with_inputs("query") for it in items if it.response is not None]


def agent_for(user: UserData, memory: EpisodicMemory, profile: str, k: int = 5, max_iters: int = 2) -> PersonaAgent:
    return PersonaAgent(Persona(user.task, profile), UserMemory(memory, user.user_id, k), max_iters=max_iters)


@dataclass
class Scored:
    """A program's answers on a user's queries and the task metrics over them."""

    metrics: dict[str, float]
    answers: list[str | None] = field(default_factory=list)
    failures: int = 0  # queries whose program call raised (LM error, unparseable output)
    parsed: int = 0  # answers that normalise to a label


T = TypeVar("T")


def or_fallback(call: Callable[[], T], fallback: T, what: str) -> T:
    """`call()`, or `fallback` (logged and counted in the open meters) when its answer is unusable
    (unparseable, empty, a program error). An LM still unreachable after DSPy's retries (timeout,
    429, 5xx) raises instead: that is an outage to retry later, not a bad answer to score."""
    try:
        return call()
    except Exception as err:
        if is_retryable_lm_error(err):
            raise
        log.warning("%s failed, using a fallback: %s", what, " ".join(str(err).split())[:200])
        count_fallback()
        return fallback


def answer_or_none(program: dspy.Module, query: str, what: str) -> str | None:
    """The program's answer, or None when it is unusable: one bad answer is a wrong answer, never
    a lost evaluation or alignment."""
    return or_fallback(lambda: program(query=query).answer, None, what)


def score(program: dspy.Module, task: Task, queries) -> Scored:
    """Run `program` on labelled queries; a failing call is logged, counted, and scored wrong."""
    answers = [answer_or_none(program, q.input, f"query {q.id}") for q in queries]
    failures = sum(a is None for a in answers)
    parsed = sum(task.normalize(a) is not None for a in answers)
    return Scored(task.score([q.gold for q in queries], answers), answers, failures, parsed)
