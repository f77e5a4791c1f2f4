"""One user's way through the method, the same for every command.

history -> episodic memory -> profile (semantic memory) -> persona -> agent -> alignment.
`demo`, `eval`, `sweep`, `nightly` and `answer` all walk it; they differ only in where the
user's memory lives (the `memory` the caller passes) and in what they do with the results.
"""

from __future__ import annotations

import contextlib
import logging
import re
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager

import dspy
from dspy.teleprompt import Teleprompter

from persona_agent.data.tasks import Task, named_labels
from persona_agent.pipelines.agent import PersonaAgent
from persona_agent.pipelines.memory import EpisodicMemory, MemoryItem, UserMemory
from persona_agent.pipelines.metering import Cost, answer_or_none, count_fallback, metered, or_fallback
from persona_agent.pipelines.persona import Persona, compose_profile, profile_problem
from persona_agent.signatures import SummarizeProfile, typed_profile

log = logging.getLogger(__name__)


def summarize(task: Task, items: list[MemoryItem], n_items: int, *, who: str = "?") -> str:
    """The profile from the latest `n_items` memories: the typed preferences and free notes the
    LM writes from them and from counts computed over the whole history (`Task.facts`); where the
    items name their labels, the typed part is the order of the user's choices between them
    (`Task.choice_order`). "" (logged, counted) when the result is no usable profile
    (`profile_problem`): never a junk one."""
    if not items:
        return ""
    # Counting is cheap and a small model cannot count: the facts cover the whole history, the
    # listing only the latest items (the prompt's budget).
    pairs = [(it.text, it.response) for it in items]
    facts, supported = task.facts(pairs, by_choice=True), task.supported_preferences(pairs)
    items = items[-n_items:]
    history = "\n".join(f"- {it.text} -> {it.response}" if it.response is not None else f"- {it.text}" for it in items)
    writer = dspy.Predict(typed_profile(SummarizeProfile, task, supported))
    writer.demos = [dspy.Example(facts=f, preferences=p, profile=n) for f, p, n in task.profile_examples(supported)]
    out = or_fallback(lambda: writer(task=task.description, history=history, facts=facts), None,
                      f"user {who}: profile summary")
    if out is None:
        return ""
    sources = [it.text for it in items]
    # Where the history's own choices order the labels, that order is the typed part: ordering
    # is counting, which a 270M writer gets wrong even with the order spelled out in its facts
    # (it wrote "sci-fi, classic" for facts that began "comedy, based on a book"). A note naming
    # another label would rank it next on nothing the choices show: such notes are left out.
    order = [label for label, _, _ in task.choice_order(pairs)[:3]]
    notes = out.profile
    if order:
        notes = " ".join(s for s in re.split(r"(?<=[.!?])\s+", notes or "")
                         if set(named_labels(task.labels, s.lower())) <= set(order))
    profile, dropped = compose_profile(task, order or out.preferences, notes, sources=sources)
    if dropped:
        log.info("user %s: profile notes left out (%s)", who, dropped)
    if problem := profile_problem(profile, task=task, sources=sources):
        count_fallback()
        log.warning("user %s: the LM wrote no usable profile (%s); starting from an empty one", who, problem)
        return ""
    return profile


def examples(task: Task, items: list[MemoryItem]) -> list[dspy.Example]:
    """The user's past interactions as `dspy.Example(query, answer, item_id, hidden)`, oldest
    first: what the task would have asked about each history item and the user's answer (see
    `Task.interactions`: for LaMP-1 they are built from the user's own papers); `hidden`, the
    items a replay of it must not find in memory."""
    return [dspy.Example(query=query, answer=answer, item_id=item_id, hidden=hidden).with_inputs("query")
            for item_id, query, answer, hidden in task.interactions([(it.item_id, it.text, it.response)
                                                                    for it in items])]


@dataclass
class UserFlow:
    """One user's flow over `memory`. The LM is whatever `dspy.settings` holds where it runs.

    Setup work (the profile, an alignment) is metered apart in `setup_cost`, by name, so a
    command can charge it to the methods that use it.
    """

    task: Task
    user_id: str
    history: list[MemoryItem]  # oldest first
    memory: EpisodicMemory
    top_k: int
    max_iters: int
    profile_items: int
    answer_step: str  # see PersonaAgent
    prior_strength: float
    support_margin: float = 3.5
    setup_cost: dict[str, Cost] = field(default_factory=dict)
    _profile: str | None = field(default=None, repr=False)

    def remember(self) -> int:
        """Write the history to episodic memory (idempotent); returns items written."""
        return self.memory.add(self.user_id, self.history)

    def view(self) -> UserMemory:
        """This user's memory, as the agent's tools see it."""
        return UserMemory(self.memory, self.user_id, self.top_k)

    def profile(self) -> str:
        """Semantic memory: the LM's profile of the user's latest history, written once."""
        if self._profile is None:
            with metered() as cost:
                self._profile = summarize(self.task, self.history, self.profile_items, who=self.user_id)
            self.setup_cost["profile"] = cost
        return self._profile

    def trainset(self) -> list[dspy.Example]:
        return examples(self.task, self.history)

    def agent(self, persona: Persona | None = None, *, memory: UserMemory | bool = True,
              semantic: str | bool = True, **kwargs) -> PersonaAgent:
        """The persona agent (default persona: from the profile).
        memory: True for this user's episodic memory, False for none, or a `UserMemory`.
        semantic: True for a `user_profile` tool returning this user's profile, False for no
        such tool, or the text it returns."""
        episodic = self.view() if memory is True else memory or None
        profile = self.profile() if semantic is True else semantic if semantic is not False else None
        kwargs = {"max_iters": self.max_iters, "answer_step": self.answer_step, "prior_strength": self.prior_strength,
                  "support_margin": self.support_margin, **kwargs}
        return PersonaAgent(persona or Persona(self.task, self.profile()), episodic, semantic=profile, **kwargs)

    def align(self, optimizer: Teleprompter, student: dspy.Module | None = None, *, trainset=None,
              name: str = "alignment", **compile_kwargs) -> dspy.Module:
        """`optimizer.compile(student, trainset=...)`, metered as setup `name`. Default student: the
        persona agent from the profile; default trainset: this user's whole history."""
        student = student if student is not None else self.agent()
        trainset = self.trainset() if trainset is None else trainset
        with metered() as cost:
            program = optimizer.compile(student, trainset=trainset, **compile_kwargs)
        self.setup_cost[name] = cost
        return program


@dataclass
class Scored:
    """A program's answers on a user's queries and the task metrics over them."""

    metrics: dict[str, float]
    answers: list[str | None] = field(default_factory=list)
    failures: int = 0  # queries whose program call raised (LM error, unparseable output)
    parsed: int = 0  # answers that normalise to a label


def score(program: dspy.Module, task: Task, queries, *, who: str = "",
          around: Callable[[Any], ContextManager] | None = None) -> Scored:
    """Run `program` on labelled queries (each inside `around(query)`, e.g. its trace): the one
    scorer of `eval`, `demo` and `nightly`. A reply that cannot be parsed is logged, counted,
    and scored wrong; an LM error is no answer and is raised (`answer_or_none`)."""
    answers = []
    for q in queries:
        with around(q) if around is not None else contextlib.nullcontext():
            answers.append(answer_or_none(program, q.input, f"{who}query {q.id}"))
    failures = sum(a is None for a in answers)
    parsed = sum(task.normalize(a) is not None for a in answers)
    known = [(q.gold, a) for q, a in zip(queries, answers) if q.gold is not None]  # a test set may hold no golds
    metrics = task.score([g for g, _ in known], [a for _, a in known]) if known else {}
    return Scored(metrics, answers, failures, parsed)
