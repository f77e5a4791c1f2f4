"""PersonaAlignment: the paper's test-time user-preference alignment as a DSPy teleprompter.

For T iterations: replay the user's latest n interactions with the current persona, compute a
textual loss (an LLM critique of simulated vs real responses), aggregate it, and rewrite the
persona's user-specific part. Beyond the paper, by default:

- a rewrite must not score worse on the batch (and, optionally, on an older held-out slice)
  than the persona it replaces, or it is rejected and the current persona stays;
- an already-perfect batch stops the loop before any critique or rewrite call;
- a rewrite that is empty, over budget, or restates the fixed template is rejected unscored;
- `loss="batch"` critiques the whole batch in one call instead of one call per interaction.

Every candidate, accepted or not, is reported as an `AlignmentStep` through `on_step`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable, Literal, Sequence

import dspy
from dspy.teleprompt import Teleprompter

from persona_agent.pipelines.agent import PersonaAgent
from persona_agent.pipelines.memory import UserMemory
from persona_agent.pipelines.persona import PROFILE_BUDGET, profile_problem
from persona_agent.pipelines.personalize import answer_or_none, or_fallback
from persona_agent.signatures import CritiqueBatch, CritiqueResponse, UpdateProfile
from persona_agent.usage import metered

log = logging.getLogger(__name__)


@dataclass
class Replay:
    """The persona's answers on a set of interactions and their mean score."""

    answers: list[str]
    score: float


@dataclass
class AlignmentStep:
    """One iteration. `batch_score` is the persona the iteration started from; `candidate_score`
    is the rewrite's (None when it was never scored)."""

    iteration: int
    batch_score: float
    profile_before: str
    profile_after: str  # the candidate rewrite (equal to profile_before when none was written)
    accepted: bool = False
    reason: str = ""
    candidate_score: float | None = None
    holdout_score: float | None = None
    candidate_holdout_score: float | None = None
    critiques: list[str] = field(default_factory=list)
    simulated: list[str] = field(default_factory=list)
    lm_calls: int = 0
    tokens: int = 0
    fallbacks: int = 0  # calls whose answer was unusable and replaced (see `or_fallback`)

    @property
    def wrote_candidate(self) -> bool:
        return self.profile_after != self.profile_before


class PersonaAlignment(Teleprompter):
    """`compile(student, trainset=...)` returns a copy of `student` (a `PersonaAgent`) whose
    persona is aligned to the user whose interactions `trainset` holds.

    trainset: `dspy.Example(query=..., answer=<the user's real response>, item_id=...)` in time
    order (oldest first); the latest `batch_size` are the alignment batch and the `holdout`
    interactions before them the held-out slice.
    guard: reject rewrites that score worse (False: the paper's loop, every rewrite accepted).
    """

    def __init__(self, batch_size: int = 3, iterations: int = 3, *, loss: Literal["per_interaction", "batch"] = "per_interaction",
                 guard: bool = True, holdout: int = 0, budget: int = PROFILE_BUDGET,
                 reflection_lm: dspy.LM | None = None, on_step: Callable[[AlignmentStep], None] | None = None):
        super().__init__()
        if batch_size < 1 or iterations < 0 or holdout < 0:
            raise ValueError("batch_size must be >= 1, iterations and holdout >= 0")
        if loss not in ("per_interaction", "batch"):
            raise ValueError(f"loss must be 'per_interaction' or 'batch', not {loss!r}")
        self.batch_size, self.iterations, self.loss, self.guard = batch_size, iterations, loss, guard
        self.holdout, self.budget = holdout, budget
        self.reflection_lm, self.on_step = reflection_lm, on_step
        self.critic = dspy.Predict(CritiqueResponse)
        self.batch_critic = dspy.Predict(CritiqueBatch)
        self.updater = dspy.Predict(UpdateProfile)
        self.steps: list[AlignmentStep] = []

    def compile(self, student: PersonaAgent, *, trainset, teacher=None, valset=None, **kwargs) -> PersonaAgent:
        program = student.deepcopy()
        history = list(trainset)
        batch = history[-self.batch_size:]
        heldout = history[-self.batch_size - self.holdout:-self.batch_size] if self.holdout else []
        self.steps = []
        if not batch:
            log.warning("no past interactions to align on; the persona is returned unchanged")
            return program
        current = current_holdout = None
        for t in range(self.iterations):
            with metered() as cost:
                if current is None:  # later iterations reuse the replay that scored the accepted persona
                    current = replay(program, batch)
                    current_holdout = replay(program, heldout) if heldout else None
                step, current, current_holdout = self._step(program, batch, heldout, current, current_holdout, t)
            step.lm_calls, step.tokens, step.fallbacks = cost.lm_calls, cost.tokens, cost.fallbacks
            self.steps.append(step)
            if self.on_step:
                self.on_step(step)
            if step.reason == "batch already answered perfectly":
                break
        return program

    def _step(self, program: PersonaAgent, batch, heldout, current: Replay, current_holdout: Replay | None, t: int):
        profile = program.persona.profile
        step = AlignmentStep(t, current.score, profile, profile, simulated=current.answers,
                             holdout_score=current_holdout.score if current_holdout else None)
        if self.guard and current.score >= 1.0:
            step.reason = "batch already answered perfectly"
            return step, current, current_holdout
        with dspy.context(lm=self.reflection_lm or dspy.settings.lm):
            step.critiques = self._critique(profile, batch, current.answers)
            feedback = aggregate(batch, current.answers, step.critiques)
            # An unusable rewrite is no rewrite: the step ends with the persona unchanged.
            step.profile_after = or_fallback(lambda: self.updater(current_profile=profile, feedback=feedback).new_profile,
                                             profile, f"iteration {t}: profile update").strip()
        if step.profile_after == profile.strip():
            step.profile_after, step.reason = profile, "rejected: no new profile was written"
            log.info("iteration %d: %s", t, step.reason)
            return step, current, current_holdout
        problem = profile_problem(step.profile_after, self.budget)
        if problem:
            step.reason = f"rejected: {problem}"
            log.info("iteration %d: %s", t, step.reason)
            return step, current, current_holdout
        candidate = program.with_persona(program.persona.with_profile(step.profile_after))
        if not self.guard:
            step.accepted, step.reason = True, "accepted (unguarded)"
            program.persona = candidate.persona
            return step, None, None  # the next iteration replays the new persona
        scored = replay(candidate, batch)
        scored_holdout = replay(candidate, heldout) if heldout else None
        step.candidate_score = scored.score
        step.candidate_holdout_score = scored_holdout.score if scored_holdout else None
        if scored.score < current.score:
            step.reason = f"rejected: batch score dropped {current.score:.3f} -> {scored.score:.3f}"
        elif scored_holdout and scored_holdout.score < current_holdout.score:
            step.reason = f"rejected: held-out score dropped {current_holdout.score:.3f} -> {scored_holdout.score:.3f}"
        else:
            step.accepted, step.reason = True, "accepted"
            program.persona = candidate.persona
            return step, scored, scored_holdout
        log.info("iteration %d: %s", t, step.reason)
        return step, current, current_holdout

    def _critique(self, profile: str, batch, answers: Sequence[str]) -> list[str]:
        if self.loss == "batch":
            listing = "\n".join(f"{i}. request: {ex.query}\n   agent: {a}\n   user: {ex.answer}"
                                for i, (ex, a) in enumerate(zip(batch, answers), 1))
            return [or_fallback(lambda: self.batch_critic(profile=profile, interactions=listing).critique, "",
                                "batch critique")]
        # A critique that cannot be read leaves the bare facts (agreed/disagreed) in the feedback.
        return [or_fallback(lambda: self.critic(profile=profile, query=ex.query, simulated_response=a,
                                                real_response=ex.answer).critique, "", "critique")
                for ex, a in zip(batch, answers)]


def replay(program: PersonaAgent, examples) -> Replay:
    """Answer past interactions with each one hidden from memory (or it would find its own
    answer); a failing call counts as a wrong answer."""
    task = program.task
    with UserMemory.excluding(ex.item_id for ex in examples):
        answers = [str(answer_or_none(program, ex.query, f"replay of {getattr(ex, 'item_id', '?')}") or "")
                   for ex in examples]
    scores = [task.example_score(ex.answer, a) for ex, a in zip(examples, answers)]
    return Replay(answers, sum(scores) / len(scores) if scores else 0.0)


def aggregate(batch, simulated: Sequence[str], critiques: Sequence[str]) -> str:
    """The textual gradient of the batch: every critique with the facts it was written from
    (one critique covering the batch when the loss was computed in one call)."""
    facts = [f"{i}. agent answered {a!r}, user answered {ex.answer!r} "
             f"({'agreed' if a.strip().lower() == str(ex.answer).strip().lower() else 'disagreed'})"
             for i, (ex, a) in enumerate(zip(batch, simulated), 1)]
    if len(critiques) == len(facts):
        return "\n".join(f"{fact}: {c}" for fact, c in zip(facts, critiques))
    return "\n".join(facts + [f"critique: {c}" for c in critiques])
