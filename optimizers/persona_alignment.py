"""PersonaAlignment: the paper's test-time user-preference alignment as a DSPy teleprompter.

For T iterations: replay the user's latest n interactions with the current persona, compute a
textual loss per interaction (an LLM critique of the simulated vs the real response), aggregate
the critiques, and rewrite the persona's user-specific part from them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable

import dspy
from dspy.teleprompt import Teleprompter

from persona_agent.pipelines.agent import PersonaAgent
from persona_agent.pipelines.memory import UserMemory
from persona_agent.pipelines.persona import looks_degenerate
from persona_agent.signatures import CritiqueResponse, UpdateProfile
from persona_agent.usage import metered

log = logging.getLogger(__name__)


@dataclass
class AlignmentStep:
    """One iteration, as logged: the batch score is of the persona the iteration started with."""

    iteration: int
    batch_score: float
    profile_before: str
    profile_after: str
    critiques: list[str] = field(default_factory=list)
    simulated: list[str] = field(default_factory=list)
    accepted: bool = True
    reason: str = ""  # why a rewrite was rejected
    lm_calls: int = 0
    tokens: int = 0


class PersonaAlignment(Teleprompter):
    """`compile(student, trainset=...)` returns a copy of `student` (a `PersonaAgent`) whose
    persona is aligned to the user whose interactions `trainset` holds.

    trainset: `dspy.Example(query=..., answer=<the user's real response>, item_id=...)` in time
    order (oldest first); the latest `batch_size` are the alignment batch.
    """

    def __init__(self, batch_size: int = 3, iterations: int = 3, reflection_lm: dspy.LM | None = None,
                 on_step: Callable[[AlignmentStep], None] | None = None):
        super().__init__()
        if batch_size < 1 or iterations < 0:
            raise ValueError("batch_size must be >= 1 and iterations >= 0")
        self.batch_size, self.iterations = batch_size, iterations
        self.reflection_lm, self.on_step = reflection_lm, on_step
        self.critic = dspy.Predict(CritiqueResponse)
        self.updater = dspy.Predict(UpdateProfile)
        self.steps: list[AlignmentStep] = []

    def compile(self, student: PersonaAgent, *, trainset, teacher=None, valset=None, **kwargs) -> PersonaAgent:
        program = student.deepcopy()
        batch = list(trainset)[-self.batch_size:]
        self.steps = []
        if not batch:
            log.warning("no past interactions to align on; the persona is returned unchanged")
            return program
        for t in range(self.iterations):
            with metered() as cost:
                step = self._step(program, batch, t)
            step.lm_calls, step.tokens = cost.lm_calls, cost.tokens
            self.steps.append(step)
            if self.on_step:
                self.on_step(step)
        return program

    def _step(self, program: PersonaAgent, batch, t: int) -> AlignmentStep:
        task, profile = program.task, program.persona.profile
        # Replay with the batch hidden from memory, or each interaction would find its own answer.
        with UserMemory.excluding(ex.item_id for ex in batch):
            simulated = [str(program(query=ex.query).answer) for ex in batch]
        scores = [task.example_score(ex.answer, sim) for ex, sim in zip(batch, simulated)]
        with dspy.context(lm=self.reflection_lm or dspy.settings.lm):
            critiques = [self.critic(profile=profile, query=ex.query, simulated_response=sim,
                                     real_response=ex.answer).critique
                         for ex, sim in zip(batch, simulated)]
            new_profile = self.updater(current_profile=profile, feedback=aggregate(batch, simulated, critiques)).new_profile
        step = AlignmentStep(t, sum(scores) / len(scores), profile, profile, critiques, simulated)
        if looks_degenerate(new_profile):
            log.warning("iteration %d: the rewrite is empty or a loop; keeping the current persona", t)
            step.accepted, step.reason = False, "degenerate rewrite"
        else:
            program.persona = program.persona.with_profile(new_profile)
            step.profile_after = program.persona.profile
        return step


def aggregate(batch, simulated: list[str], critiques: list[str]) -> str:
    """The textual gradient of the batch: every critique, with the facts it was written from."""
    lines = []
    for i, (ex, sim, critique) in enumerate(zip(batch, simulated, critiques), 1):
        verdict = "agreed" if sim.strip().lower() == str(ex.answer).strip().lower() else "disagreed"
        lines.append(f"{i}. agent answered {sim!r}, user answered {ex.answer!r} ({verdict}): {critique}")
    return "\n".join(lines)
