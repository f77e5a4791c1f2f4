"""PersonaAlignment: the paper's test-time user-preference alignment as a DSPy teleprompter.

For T iterations: replay the user's latest n interactions with the current persona, compute a
textual loss (an LLM critique of simulated vs real responses), aggregate it, and rewrite the
persona's user-specific part. Beyond the paper, by default:

- a rewrite must score better on the batch than the persona it replaces (or tie there and do
  better on an optional older held-out slice), and never worse on that slice, or it is
  rejected and the current persona stays;
- an already-perfect batch stops the loop before any critique or rewrite call;
- a rewrite that is empty, over budget, or restates the fixed template is rejected unscored;
- a rewrite must do better: one that only ties the current persona on the batch (and on the
  held-out slice, if any) is rejected, so a noisy rewriter cannot walk a good persona away on
  evidence that cannot tell the two apart; and no candidate is scored at all unless it passes
  the profile check (a description of the user's preferences in the task's terms, not a URL,
  an id, a number string or a copy of an input);
- `loss="batch"` critiques the whole batch in one call instead of one call per interaction.

`guard=False` is the paper's loop: every rewrite is accepted unscored, except one that fails the
profile check (junk, over budget, or carrying instructions to the agent).

The optimizer knows programs only through `PersonaProgram` (read the persona, make the same
program under another persona, answer a query) and scores answers only through `metric`, the
way GEPA's adapter keeps "how to evaluate a candidate" apart from "how to search". Every
candidate, accepted or not, is an `AlignmentStep`: reported through `on_step` as it happens and
attached to the returned program as `alignment_steps`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import Callable, Literal, Protocol, Sequence, runtime_checkable

import dspy
from dspy.teleprompt import Teleprompter

from persona_agent.data.tasks import TENDENCIES
from persona_agent.optimizers.acceptance import Acceptance, AcceptValid, ConsistentImprovement, Outcome, Trial
from persona_agent.pipelines.memory import UserMemory
from persona_agent.pipelines.metering import answer_or_none, metered, or_fallback
from persona_agent.pipelines.persona import PROFILE_BUDGET, Persona, compose_profile, profile_problem
from persona_agent.pipelines.spans import span
from persona_agent.signatures import CritiqueBatch, CritiqueResponse, UpdateProfile, typed_profile

log = logging.getLogger(__name__)

Metric = Callable[..., float]  # metric(example, prediction, trace=None) -> score in [0, 1], higher is better


@runtime_checkable
class PersonaProgram(Protocol):
    """What the optimizer needs of a program: any `dspy.Module` conditioned on a `Persona`.

    `with_persona` must return the same program (tools, memory, settings, subclass) under
    another persona, leaving `self` unchanged: every candidate and every replay goes through it.
    """

    @property
    def persona(self) -> Persona: ...

    def with_persona(self, persona: Persona) -> "PersonaProgram": ...

    def __call__(self, *, query: str) -> dspy.Prediction: ...


def task_metric(example: dspy.Example, prediction: dspy.Prediction, trace=None, *, task) -> float:
    """The task's per-example score: exact label match, or 1 - |rating error| / 4."""
    return task.example_score(example.answer, getattr(prediction, "answer", None))


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
    outcome: Outcome | None = None
    problem: str = ""  # Outcome.REFUSED: what the profile check found
    candidate_score: float | None = None
    holdout_score: float | None = None
    candidate_holdout_score: float | None = None
    critiques: list[str] = field(default_factory=list)
    simulated: list[str] = field(default_factory=list)
    lm_calls: int = 0
    tokens: int = 0
    fallbacks: int = 0  # calls whose answer was unusable and replaced (see `or_fallback`)

    @property
    def accepted(self) -> bool:
        return self.outcome is Outcome.ACCEPTED

    @property
    def wrote_candidate(self) -> bool:
        return self.profile_after != self.profile_before

    @property
    def kind(self) -> str:
        """What to count the iteration by: the outcome, a refusal by what the check found
        (without its particulars: "over the length budget", not its character counts)."""
        if self.outcome is Outcome.REFUSED:
            return f"refused: {self.problem.split(' (')[0]}"
        return str(self.outcome or "")

    @property
    def reason(self) -> str:
        """The outcome in words, with its particulars, for logs and version descriptions."""
        o = self.outcome
        if o is Outcome.REFUSED:
            return f"rejected: {self.problem}"
        if o is Outcome.BATCH_DROPPED:
            return f"rejected: {o} {self.batch_score:.3f} -> {self.candidate_score:.3f}"
        if o is Outcome.HELDOUT_DROPPED:
            return f"rejected: {o} {self.holdout_score:.3f} -> {self.candidate_holdout_score:.3f}"
        if o is Outcome.TIED:
            return f"rejected: {o} ({self.batch_score:.3f}); a tie keeps it"
        if o is Outcome.ACCEPTED and self.candidate_score is None:
            return "accepted (unscored)"
        return f"rejected: {o}" if o is Outcome.NOTHING_WRITTEN else str(o or "")


class PersonaAlignment(Teleprompter):
    """`compile(student, trainset=...)` returns `student` under a persona aligned to the user
    whose interactions `trainset` holds; `student` itself is left unchanged.

    student: a `PersonaProgram` (`PersonaAgent`, `RetrievalAnswer`, or your own module).
    trainset: `dspy.Example(query=..., answer=<the user's real response>, item_id=...)` in time
        order (oldest first); the latest `batch_size` are the alignment batch. `item_id` hides the
        item from memory search while it is replayed (it would find its own answer).
    valset: the held-out slice, as GEPA takes it: a rewrite must not score worse on it, and a tie
        on the batch ships only if it does better there. Default: the `holdout` interactions
        before the batch (none when `holdout` is 0).
    metric: `metric(example, prediction, trace=None) -> float` in [0, 1]; default: the task's
        score, for the task of the student's persona.
    acceptance: the rule that ships a rewrite (`optimizers.acceptance`); default
        `ConsistentImprovement` (strict, and no worse agreement with the latest 2n interactions),
        or with `guard=False` the paper's `AcceptValid`.
    redraw_temperature: after an iteration that shipped nothing, the next rewrite is sampled at
        this temperature (seeded by the iteration) rather than written greedily, which would
        repeat the last; 0 keeps every rewrite greedy.
    """

    def __init__(self, *, batch_size: int, iterations: int, metric: Metric | None = None,
                 loss: Literal["per_interaction", "batch"] = "per_interaction", guard: bool = True, holdout: int = 0,
                 budget: int = PROFILE_BUDGET, reflection_lm: dspy.LM | None = None,
                 on_step: Callable[[AlignmentStep], None] | None = None, acceptance: Acceptance | None = None,
                 redraw_temperature: float = 0.7):
        super().__init__()
        if batch_size < 1 or iterations < 0 or holdout < 0:
            raise ValueError("batch_size must be >= 1, iterations and holdout >= 0")
        if loss not in ("per_interaction", "batch"):
            raise ValueError(f"loss must be 'per_interaction' or 'batch', not {loss!r}")
        self.batch_size, self.iterations, self.metric, self.loss = batch_size, iterations, metric, loss
        self.acceptance = acceptance or (ConsistentImprovement() if guard else AcceptValid())
        self.holdout, self.budget = holdout, budget
        self.reflection_lm, self.on_step = reflection_lm, on_step
        # After an iteration that shipped nothing, the next sees the same persona, batch and
        # feedback, and a greedy rewriter would write the same candidate again (from the cache):
        # it is drawn at this temperature instead, seeded by the iteration so a rerun draws the
        # same (0: greedy every time).
        self.redraw_temperature = redraw_temperature
        self.critic = dspy.Predict(CritiqueResponse)
        self.batch_critic = dspy.Predict(CritiqueBatch)
        self.updaters: dict = {}  # task -> the update predictor, its preferences typed to the task
        self.steps: list[AlignmentStep] = []  # the last compile's, as also attached to its program

    def compile(self, student: PersonaProgram, *, trainset, teacher=None, valset=None, **kwargs) -> PersonaProgram:
        if not isinstance(student, PersonaProgram):
            raise TypeError(f"{type(student).__name__} is not a PersonaProgram (persona, with_persona, __call__)")
        task = student.persona.task
        metric = self.metric or (lambda ex, pred, trace=None: task_metric(ex, pred, task=task))
        history = list(trainset)
        batch = history[-self.batch_size:]
        if valset is not None:
            heldout = list(valset)
        else:
            heldout = history[-self.batch_size - self.holdout:-self.batch_size] if self.holdout else []
        program, steps = student.with_persona(student.persona), []
        if not batch:
            log.warning("no past interactions to align on; the persona is returned unchanged")
        current = current_holdout = None
        for t in range(self.iterations if batch else 0):
            with metered() as cost:
                if current is None:  # later iterations reuse the replay that scored the accepted persona
                    with span("replay", iteration=t, persona="current", interactions=len(batch)):
                        current = replay(program, batch, metric)
                        current_holdout = replay(program, heldout, metric) if heldout else None
                redraw = bool(steps) and not steps[-1].accepted and self.redraw_temperature > 0
                step, program, current, current_holdout = self._step(
                    program, batch, heldout, metric=metric, current=current, current_holdout=current_holdout, t=t,
                    redraw=redraw, history=history)
            step.lm_calls, step.tokens, step.fallbacks = cost.lm_calls, cost.tokens, cost.fallbacks
            steps.append(step)
            if self.on_step:
                self.on_step(step)
            if step.outcome is Outcome.PERFECT:
                break
        self.steps = program.alignment_steps = steps
        return program

    def _step(self, program, batch, heldout, *, metric, current: Replay, current_holdout: Replay | None, t: int,
              redraw: bool = False, history: Sequence = ()):
        """One iteration from `program`; returns the step and the program, replay and held-out
        replay the next iteration starts from."""
        profile = program.persona.profile
        step = AlignmentStep(t, current.score, profile, profile, simulated=current.answers,
                             holdout_score=current_holdout.score if current_holdout else None)
        unchanged = step, program, current, current_holdout
        if self.acceptance.needs_scores and current.score >= 1.0:
            step.outcome = Outcome.PERFECT
            return unchanged
        task = program.persona.task
        with dspy.context(lm=self.reflection_lm or dspy.settings.lm):
            with span("critique", iteration=t, loss=self.loss):
                step.critiques = self._critique(profile, batch, current.answers)
            feedback = aggregate(batch, current.answers, step.critiques)
            # An unusable rewrite is no rewrite: the step ends with the persona unchanged.
            with span("update", iteration=t):
                recent = task.facts([(ex.query, ex.answer) for ex in batch])
                draw = {"config": {"temperature": self.redraw_temperature, "rollout_id": t, "seed": t}} if redraw else {}
                update = or_fallback(lambda: self._updater(task)(current_profile=profile, recent=recent,
                                                                 feedback=feedback, **draw), None,
                                     f"iteration {t}: profile update")
        sources = [ex.query for ex in batch]
        if update is not None:
            step.profile_after, dropped = compose_profile(task, update.preferences, update.new_profile, sources=sources)
            if dropped:
                log.info("iteration %d: notes of the rewrite left out (%s)", t, dropped)
        if step.profile_after.strip() in ("", profile.strip()):
            step.profile_after, step.outcome = profile, Outcome.NOTHING_WRITTEN
        elif problem := profile_problem(step.profile_after, self.budget, task, sources=sources):
            step.outcome, step.problem = Outcome.REFUSED, problem
        if step.outcome:
            log.info("iteration %d: %s", t, step.reason)
            return unchanged
        candidate = program.with_persona(program.persona.with_profile(step.profile_after))
        trial = Trial(task, batch, profile, step.profile_after, history=history)
        if not self.acceptance.needs_scores:
            step.outcome = self.acceptance(trial)
            if step.accepted:
                return step, candidate, None, None  # the next iteration replays the new persona
            log.info("iteration %d: %s", t, step.reason)
            return unchanged
        with span("replay", iteration=t, persona="candidate", interactions=len(batch)):
            scored = replay(candidate, batch, metric)
            scored_holdout = replay(candidate, heldout, metric) if heldout else None
        step.candidate_score = scored.score
        step.candidate_holdout_score = scored_holdout.score if scored_holdout else None
        step.outcome = self.acceptance(replace(trial, current=current.score, candidate=scored.score,
                                               current_holdout=current_holdout.score if current_holdout else None,
                                               candidate_holdout=step.candidate_holdout_score))
        if step.accepted:
            return step, candidate, scored, scored_holdout
        log.info("iteration %d: %s", t, step.reason)
        return unchanged

    def _updater(self, task) -> dspy.Predict:
        if task not in self.updaters:
            updater = dspy.Predict(typed_profile(UpdateProfile, task))
            updater.demos = update_demos(task)
            self.updaters[task] = updater
        return self.updaters[task]

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


def update_demos(task) -> list[dspy.Example]:
    """Two worked rewrites, made up from the task's own labels and fact format (no user's data):
    a profile whose order the latest interactions contradict, and the profile that follows them.
    They show a small base model, which continues patterns far better than it follows an
    instruction, that what the user chose now moves up. None for topics (no order to move)."""
    if task.preference_kind == "topics":
        return []
    demos = []
    for facts, preferences, notes in task.profile_examples():
        if task.preference_kind == "tendency":  # the agent scored as the review reads, the user did not
            generous = preferences == TENDENCIES[2]
            before, answers, recent = TENDENCIES[1], *((["4", "3", "4"], ["5", "4", "5"]) if generous else
                                                       (["3", "3", "2"], ["2", "2", "1"]))
        else:  # the user moved to a, which the profile ranks last
            a, b, c = preferences
            before, answers, recent = [b, c, a], [b, b, b], [a, a, b]
        profile, _ = compose_profile(task, before, "")
        feedback = "\n".join(f"{i}. agent answered {x!r}, user answered {r!r} ({'agreed' if x == r else 'disagreed'})"
                             for i, (x, r) in enumerate(zip(answers, recent), 1))
        demos.append(dspy.Example(current_profile=profile, recent=task.facts([("", r) for r in recent]),
                                  feedback=feedback, preferences=preferences, new_profile=notes))
    return demos


def replay(program: PersonaProgram, examples, metric: Metric) -> Replay:
    """Answer past interactions with each one hidden from memory (or it would find its own
    answer); a failing call counts as a wrong answer."""
    with UserMemory.excluding(hidden_ids(examples)):
        answers = [str(answer_or_none(program, ex.query, f"replay of {ex.get('item_id', '?')}") or "")
                   for ex in examples]
    scores = [float(metric(ex, dspy.Prediction(answer=a))) for ex, a in zip(examples, answers)]
    return Replay(answers, sum(scores) / len(scores) if scores else 0.0)


def hidden_ids(examples) -> set[str]:
    """The items replaying these examples must not find in memory: each one's own (`item_id`) and
    any it quotes (`hidden`)."""
    return {i for ex in examples for i in (*ex.get("hidden", ()), *([ex.item_id] if "item_id" in ex else []))}


def aggregate(batch, simulated: Sequence[str], critiques: Sequence[str]) -> str:
    """The textual gradient of the batch: every critique with the facts it was written from
    (one critique covering the batch when the loss was computed in one call)."""
    facts = [f"{i}. agent answered {a!r}, user answered {ex.answer!r} "
             f"({'agreed' if a.strip().lower() == str(ex.answer).strip().lower() else 'disagreed'})"
             for i, (ex, a) in enumerate(zip(batch, simulated), 1)]
    if len(critiques) == len(facts):
        return "\n".join(f"{fact}: {c}" for fact, c in zip(facts, critiques))
    return "\n".join(facts + [f"critique: {c}" for c in critiques])
