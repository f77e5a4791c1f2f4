"""The evaluation's method table: every method `eval` compares, built from one user's flow.

`METHODS` maps a name to a builder `UserContext -> dspy.Module`; each program answers
`program(query=...)`. What several methods share (the profile, the aligned persona) is computed
once per user by `UserContext`, and its LM cost is kept apart as setup cost.
"""

from __future__ import annotations

from typing import Callable

import dspy

from persona_agent.data.synthetic import rule_profile
from persona_agent.optimizers import AlignmentStep
from persona_agent.optimizers.persona_alignment import hidden_ids
from persona_agent.pipelines.agent import Direct, InContext, Lookup, PersonaAgent, RetrievalAnswer, non_personalized
from persona_agent.pipelines.flow import UserFlow
from persona_agent.pipelines.metering import lm_errors_raised, or_fallback
from persona_agent.pipelines.persona import Persona
from persona_agent.runtime.progress import library_prints
from persona_agent.runtime.wiring import alignment
from persona_agent.settings import Settings
from persona_agent.signatures import CritiqueResponse


class NotApplicable(Exception):
    """The method has nothing to work with for this user. One with an unaligned form
    (`UNALIGNED`: no past interactions to learn from) answers in that form, counted; one without
    (`oracle` where no planted rule is known) is left out, and reads n/a where it applies to
    nobody: never a number copied from another method."""


class UserContext:
    """One user's flow plus what the methods share, each computed on first use. `rule`: the
    user's planted preference rule, where the data was generated with one (the oracle's)."""

    def __init__(self, flow: UserFlow, settings: Settings, rule: dict | None = None):
        self.flow, self.settings, self.task, self.rule = flow, settings, flow.task, rule
        self.steps: dict[str, list[AlignmentStep]] = {}  # alignment name -> its steps
        self._aligned: PersonaAgent | None = None

    @property
    def setup_cost(self):
        return self.flow.setup_cost

    def interactions(self) -> list[dspy.Example]:
        examples = self.flow.trainset()
        if not examples:
            raise NotApplicable(f"user {self.flow.user_id} has no past interactions to learn from")
        return examples

    def aligned(self) -> PersonaAgent:
        if self._aligned is None:
            self.interactions()
            self._aligned = self.flow.align(alignment(self.settings))
            self.steps["alignment"] = self._aligned.alignment_steps
        return self._aligned

    def aligned_without_memory(self) -> PersonaAgent:
        """The full method less memory: no episodic recall (no prefetch, no search tool) and no
        semantic profile (no profile tool, and the persona starts empty), aligned on the same batch."""
        self.interactions()
        student = self.flow.agent(Persona(self.task, ""), memory=False, semantic=False)
        program = self.flow.align(alignment(self.settings), student, name="alignment w/o memory")
        self.steps["alignment w/o memory"] = program.alignment_steps
        return program

    def gepa(self) -> dspy.Module:
        """dspy.GEPA on the same student and batch, on equal information and budget: its feedback
        is the alignment's textual loss (the same critique signature on the same interactions),
        and its metric calls are capped so its LM calls come to about the alignment's own (as
        measured for this user; both are reported as setup LM calls)."""
        s, task = self.settings, self.task
        batch = self.interactions()[-s.batch_size:]
        view = self.flow.view()
        student = self.flow.agent(memory=view)
        self.aligned()  # the budget to match
        critic, start = dspy.Predict(CritiqueResponse), student.persona.profile

        def metric(gold, pred, trace=None, pred_name=None, pred_trace=None):
            answer = str(getattr(pred, "answer", None) or "")
            score = task.example_score(gold.answer, answer)
            feedback = or_fallback(lambda: critic(profile=start, query=gold.query, simulated_response=answer,
                                                  real_response=gold.answer).critique, "", "GEPA critique")
            facts = f"The user answered {gold.answer!r}; the agent answered {answer!r}."
            return dspy.Prediction(score=score, feedback=f"{facts} {feedback}".strip())

        # one metric call = one program run (a ReAct step per iteration + the extraction) + one critique
        per_call = s.max_iters + 2
        budget = max(len(batch), self.setup_cost["alignment"].lm_calls // per_call)
        optimizer = dspy.GEPA(metric, max_metric_calls=budget, reflection_lm=dspy.settings.lm,
                              reflection_minibatch_size=len(batch), use_merge=False, num_threads=1,
                              track_stats=False, seed=0)
        view.exclude = frozenset(hidden_ids(batch))  # replays must not find their own answers
        try:
            # DSPy's evaluator inside GEPA scores a failing call 0 and goes on; its bars print to stdout
            with lm_errors_raised(), library_prints():
                return self.flow.align(optimizer, student, trainset=batch, valset=batch, name="gepa")
        finally:
            view.exclude = frozenset()


def _profiled(c: UserContext) -> Persona:
    return Persona(c.task, c.flow.profile())


def _oracle(c: UserContext) -> Persona:
    """The persona whose profile is the user's planted rule written out: the ceiling of what a
    profile can carry to this answer model (synthetic data only)."""
    if c.rule is None:
        raise NotApplicable("no planted rule is known for this data (only generated sets have one)")
    return Persona(c.task, rule_profile(c.task, c.rule))


def _lookup(c: UserContext) -> dspy.Module:
    return Lookup(c.task, [(it.text, it.response) for it in c.flow.history])


Builder = Callable[[UserContext], dspy.Module]

# What each method sees is the README's "Methods" table; every one answers under the same task
# instruction (`pipelines.persona.INSTRUCTION`) and adds or removes one component.
METHODS: dict[str, Builder] = {
    "non-personalized": lambda c: non_personalized(c.task),
    "icl": lambda c: InContext(c.task, c.interactions(), c.settings.top_k),
    "rag": lambda c: RetrievalAnswer(Persona.neutral(c.task), c.flow.view()),
    "pag": lambda c: RetrievalAnswer(_profiled(c), c.flow.view()),
    "react": lambda c: c.flow.agent(Persona.neutral(c.task), prefetch=False, semantic=False),
    "membank": lambda c: c.flow.agent(_profiled(c), prefetch=False),
    "persona-agent": lambda c: c.aligned(),
    "persona-agent (tools only)": lambda c: c.flow.agent(c.aligned().persona, prefetch=False),
    # ablations of the full method, each removing exactly one module
    "w/o alignment": lambda c: c.flow.agent(_profiled(c)),
    "w/o persona": lambda c: c.flow.agent(Persona.neutral(c.task)),
    "w/o memory": lambda c: c.aligned_without_memory(),
    "w/o action": lambda c: Direct(c.aligned().persona),
    # DSPy's reflective optimizer on the same persona agent, batch and budget
    "gepa": lambda c: c.gepa(),
    # calibration: what copying alone reaches (no LLM), and the persona agent given the user's
    # planted rule as its profile (the ceiling of what a profile carries to this answer model)
    "lookup": _lookup,
    "oracle": lambda c: c.flow.agent(_oracle(c)),
}

# A method with nothing to learn from for a user (no past interactions) answers for them in its
# unaligned form, counted and shown, so every row covers the same queries.
UNALIGNED: dict[str, Builder] = {
    "icl": METHODS["non-personalized"],
    "persona-agent": METHODS["w/o alignment"],
    "persona-agent (tools only)": METHODS["membank"],
    "w/o memory": lambda c: c.flow.agent(Persona(c.task, ""), memory=False, semantic=False),
    "w/o action": lambda c: Direct(_profiled(c)),
    "gepa": METHODS["w/o alignment"],
}

# Which setup each method pays for (its share of the per-user cost).
SETUP: dict[str, tuple[str, ...]] = {
    "pag": ("profile",), "membank": ("profile",), "w/o alignment": ("profile",), "w/o persona": ("profile",),
    "persona-agent": ("profile", "alignment"), "persona-agent (tools only)": ("profile", "alignment"),
    "w/o memory": ("alignment w/o memory",), "w/o action": ("profile", "alignment"), "gepa": ("profile", "gepa"),
}


def resolve(names: str | list[str]) -> list[str]:
    """'all', a comma-separated string or a list -> known method names, in table order."""
    if isinstance(names, str):
        names = list(METHODS) if names == "all" else [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {list(METHODS)} or 'all'")
    return [n for n in METHODS if n in names]
