"""Every method of the paper's evaluation, built per user over the same memory and task.

`METHODS` maps a name to a builder `UserContext -> dspy.Module`; each program answers
`program(query=...)`. What several methods share (the profile, the aligned persona) is computed
once per user by `UserContext`, and its LM cost is kept apart as setup cost.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import dspy

from persona_agent.config import Settings
from persona_agent.eval.data import UserData
from persona_agent.optimizers import AlignmentStep, PersonaAlignment
from persona_agent.usage import Cost, metered

from .agent import InContext, NonPersonalized, PersonaAgent, RetrievalAnswer
from .memory import EpisodicMemory, NoMemory, UserMemory
from .persona import GENERIC_TEMPLATE, SUMMARY_TEMPLATE, Persona
from .personalize import trainset, write_profile


@dataclass
class UserContext:
    user: UserData
    memory: EpisodicMemory
    settings: Settings
    setup_cost: dict[str, Cost] = field(default_factory=dict)  # "profile", "alignment"
    steps: list[AlignmentStep] = field(default_factory=list)
    _profile: str | None = None
    _aligned: PersonaAgent | None = None

    @property
    def task(self):
        return self.user.task

    def view(self) -> UserMemory:
        return UserMemory(self.memory, self.user.user_id, self.settings.top_k)

    def profile(self) -> str:
        if self._profile is None:
            with metered() as cost:
                self._profile = write_profile(self.user, self.settings.profile_items)
            self.setup_cost["profile"] = cost
        return self._profile

    def student(self) -> PersonaAgent:
        return PersonaAgent(Persona(self.task, self.profile()), self.view(), self.settings.max_iters)

    def aligned(self) -> PersonaAgent:
        if self._aligned is None:
            s = self.settings
            optimizer = PersonaAlignment(s.batch_size, s.iterations, loss=s.loss, guard=s.guard, holdout=s.holdout)
            student = self.student()
            with metered() as cost:
                self._aligned = optimizer.compile(student, trainset=trainset(self.user))
            self.setup_cost["alignment"], self.steps = cost, optimizer.steps
        return self._aligned

    def gepa(self) -> dspy.Module:
        """dspy.GEPA on the same student and batch, with about the alignment loop's number of
        program runs: n to score the start, then n per candidate, for T candidates."""
        s, view = self.settings, self.view()
        batch = trainset(self.user)[-s.batch_size:]
        student = PersonaAgent(Persona(self.task, self.profile()), view, s.max_iters)
        if not batch:
            return student
        task = self.task

        def metric(gold, pred, trace=None, pred_name=None, pred_trace=None):
            score = task.example_score(gold.answer, getattr(pred, "answer", None))
            return dspy.Prediction(score=score, feedback=f"The user answered {gold.answer!r}; the agent answered "
                                                         f"{getattr(pred, 'answer', None)!r}.")

        optimizer = dspy.GEPA(metric, max_metric_calls=len(batch) * (s.iterations + 1), reflection_lm=dspy.settings.lm,
                              reflection_minibatch_size=len(batch), use_merge=False, num_threads=1,
                              track_stats=False, seed=0)
        view.exclude = frozenset(ex.item_id for ex in batch)  # replays must not find their own answers
        try:
            with metered() as cost:
                program = optimizer.compile(student, trainset=batch, valset=batch)
        finally:
            view.exclude = frozenset()
        self.setup_cost["gepa"] = cost
        return program

    def agent(self, persona: Persona, memory=None, **kwargs) -> PersonaAgent:
        return PersonaAgent(persona, memory if memory is not None else self.view(),
                            kwargs.pop("max_iters", self.settings.max_iters), **kwargs)


def _generic(c: UserContext) -> Persona:
    return Persona(c.task, "", GENERIC_TEMPLATE)


def _summary(c: UserContext) -> Persona:
    return Persona(c.task, c.profile(), SUMMARY_TEMPLATE)


Builder = Callable[[UserContext], dspy.Module]

METHODS: dict[str, Builder] = {
    "non-personalized": lambda c: NonPersonalized(c.task),
    "icl": lambda c: InContext(c.task, c.user.interactions(), c.settings.top_k),
    "rag": lambda c: RetrievalAnswer(_generic(c), c.view()),
    "pag": lambda c: RetrievalAnswer(_summary(c), c.view()),
    "react": lambda c: c.agent(_generic(c), prefetch=False),
    "membank": lambda c: c.agent(_summary(c)),
    "persona-agent": lambda c: c.aligned(),
    # ablations of the full method
    "w/o alignment": lambda c: c.student(),
    "w/o persona": lambda c: c.agent(_generic(c)),
    "w/o memory": lambda c: c.agent(c.aligned().persona, NoMemory()),
    "w/o action": lambda c: c.agent(c.aligned().persona, max_iters=0),
    # DSPy's reflective optimizer on the same persona agent, batch and budget
    "gepa": lambda c: c.gepa(),
}

# Which setup each method pays for (its share of the per-user cost).
SETUP: dict[str, tuple[str, ...]] = {
    "pag": ("profile",), "membank": ("profile",), "w/o alignment": ("profile",),
    "persona-agent": ("profile", "alignment"), "w/o memory": ("profile", "alignment"),
    "w/o action": ("profile", "alignment"), "gepa": ("profile", "gepa"),
}


def resolve(names: str | list[str]) -> list[str]:
    """'all', a comma-separated string or a list -> known method names, in table order."""
    if isinstance(names, str):
        names = list(METHODS) if names == "all" else [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {list(METHODS)} or 'all'")
    return [n for n in METHODS if n in names]
