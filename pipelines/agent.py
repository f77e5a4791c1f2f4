"""The persona-conditioned agent and the programs of the baselines.

`PersonaAgent` is one user's program: the persona is the instruction of its ReAct answering
predictors, its tools reach only that user's episodic memory and semantic profile, and its
answer is typed to the task's label set. DSPy optimizers (ours included) therefore see an
ordinary module whose instructions they can read and rewrite.

Every program here answers under the same task instruction (`persona.instruction`); they differ
only in what they add to it.
"""

from __future__ import annotations

import copy
from typing import Any

import dspy
from typing_extensions import TypedDict  # pydantic needs this one before Python 3.12

from persona_agent.data.calibration import lookup
from persona_agent.data.tasks import Task
from persona_agent.overrides import ReAct
from persona_agent.pipelines.evidence import (ANSWER_STEPS, EvidenceAnswer, add_prior, first_fit, note_prompting,
                                              scoring_unsupported)
from persona_agent.pipelines.memory import UserMemory, format_recalls
from persona_agent.pipelines.persona import NOTHING_KNOWN, Persona, instruction
from persona_agent.signatures import FormulateMemoryQuery, PlainAnswer, TaskAnswer, typed_to


class PersonaAgent(dspy.Module):
    def __init__(self, persona: Persona, memory: UserMemory | None, *, max_iters: int, semantic: str | None = None,
                 formulate_query: bool = False, prefetch: bool = True, answer_step: str = "evidence",
                 prior_strength: float = 2.0, support_margin: float = 3.5):
        """memory: the user's episodic memory, reached by the `search_memory` tool and (with
        `prefetch`) an upfront search whose recalls are also few-shot demonstrations; None: no
        episodic memory at all. semantic: the user's profile (semantic memory) that the
        `user_profile` tool returns; None: no such tool. `formulate_query`: have the LM write the
        upfront memory query (for inputs whose item text the task cannot cut out by pattern).
        answer_step: "evidence", the persona's typed preferences are a prior on the LM's label
        scores, `prior_strength` nats at most (`pipelines.evidence`); "prompt", the paper's agent:
        the persona is the instruction of every step and the answer is generated.
        support_margin: for a task that reads its items (`Task.reading`), how far (nats) below the
        best label a label the item supports may score; the persona chooses among them."""
        super().__init__()
        if answer_step not in ANSWER_STEPS:
            raise ValueError(f"answer_step must be one of {ANSWER_STEPS}, not {answer_step!r}")
        self.memory, self.semantic, self.max_iters = memory, semantic, max_iters
        self.answer_step, self.prior_strength, self.support_margin = answer_step, prior_strength, support_margin
        self.prefetch = prefetch and memory is not None
        self.formulate = dspy.Predict(FormulateMemoryQuery) if formulate_query else None
        self.persona = persona

    @property
    def task(self) -> Task:
        return self._persona.task

    @property
    def persona(self) -> Persona:
        return self._persona

    @persona.setter
    def persona(self, persona: Persona) -> None:
        """Re-instruct the answering predictors; ReAct bakes instructions in at construction."""
        self._persona = persona
        task = persona.task
        # The paper's agent, built on first need by an "evidence" agent whose LM cannot score;
        # held outside the module tree, so an optimizer sees the predictors of one agent only.
        self._prompting = _Holder()
        if self.answer_step == "prompt":
            self.act = _react(task, persona.render(), self.max_iters, tools=self.tools(persona))
            return
        # The steps read the shared task instruction, the answer step weighs the persona: every
        # persona of this user runs the same LM calls, and only the prior differs.
        self.act = _react(task, instruction(task), self.max_iters, tools=self.tools(persona))
        profile = persona.known  # the placeholder's words ("nothing known") are no topics to weigh
        # a list of labels is an order of choice (the first the item supports, or fits); a
        # tendency or topics are degrees, added to the item's evidence
        labels = task.preference_kind == "labels"
        self.act.extract = EvidenceAnswer(self.act.extract.signature, task.labels,
                                          lambda inputs: task.prior(profile,
                                                                    inputs["query"]), strength=self.prior_strength,
                                          content_free=task.content_free, combine=first_fit if labels else add_prior,
                                          reading=task.reading if labels and task.reading_form else None,
                                          margin=self.support_margin)

    def tools(self, persona: Persona) -> list[dspy.Tool]:
        """The agent's tools, over this user's data only. Override to add your own."""
        return memory_tools(self.memory, persona.task, self.semantic)

    def forward(self, query: str) -> dspy.Prediction:
        recalls = self.memory.search(self._search_text(query)) if self.prefetch else []
        shown = (format_recalls(recalls) if self.prefetch else "(none retrieved up front: use search_memory)"
                 if self.memory is not None else "(no memory)")
        # The recalled interactions are also few-shot demonstrations: the answer step sees the
        # user's own choices in the very shape it must produce.
        pred = self._act()(query=query, memories=shown, demos=recall_demos(self.task, recalls))
        return dspy.Prediction(answer=pred.answer, trajectory=pred.trajectory,
                               memories=[r.item.item_id for r in recalls],
                               **{k: pred[k] for k in ("scores", "logprobs", "bias", "support") if k in pred})

    def _act(self) -> dspy.Module:
        """The ReAct that answers: this agent's, or where it scores labels and the LM cannot, the
        paper's prompting one (logged once per reason)."""
        if self.answer_step == "prompt" or (why := scoring_unsupported(dspy.settings.lm, dspy.settings.adapter)) is None:
            return self.act
        note_prompting(why)
        if self._prompting.act is None:
            self._prompting.act = _react(self.task, self._persona.render(), self.max_iters,
                                         tools=self.tools(self._persona))
        return self._prompting.act

    def with_persona(self, persona: Persona) -> "PersonaAgent":
        """The same agent (class, memory, settings, a subclass's own state) under another persona.
        A shallow copy: the persona setter then builds fresh answering predictors with this
        agent's `tools`, so nothing is deep-copied that the new persona replaces anyway."""
        twin = copy.copy(self)
        twin.persona = persona
        return twin

    def _search_text(self, query: str) -> str:
        return self.formulate(query=query).search_query if self.formulate else self.task.query_content(query)

    def dump_state(self, *args, **kwargs):
        return {**super().dump_state(*args, **kwargs), "persona_profile": self._persona.profile}

    def load_state(self, state, **kwargs):
        state = dict(state)
        self.persona = self._persona.with_profile(state.pop("persona_profile", self._persona.profile))
        return super().load_state(state, **kwargs)


class _Holder:
    act: dspy.Module | None = None


def memory_tools(memory: UserMemory | None, task: Task, semantic: str | None) -> list[dspy.Tool]:
    # Closures over values, not over the agent: a deep copy of the program must not reach back
    # into the original.
    tools = []
    if memory is not None:
        def search_memory(query: str) -> str:
            """Search this user's own past interactions; returns similar items with the user's responses."""
            return format_recalls(memory.search(task.query_content(query)))

        tools.append(dspy.Tool(search_memory))
    if semantic is not None:
        profile = semantic.strip() or NOTHING_KNOWN

        def user_profile() -> str:
            """This user's profile: their stable preferences."""
            return profile

        tools.append(dspy.Tool(user_profile))
    return tools


class _ReAct(ReAct):
    def extraction_inputs(self, inputs: dict) -> dict:
        # The extraction sees the recalled interactions as demonstrations already; listing the
        # same items again as `memories` would only lengthen its prompt (about a fifth of it).
        return {**inputs, "memories": "(the examples below)"} if inputs.get("demos") else inputs


_prototypes: dict[tuple, _ReAct] = {}


def _react(task: Task, instructions: str, max_iters: int, *, tools: list[dspy.Tool]) -> _ReAct:
    """A ReAct answering under `instructions` with `tools`. Building one builds five pydantic
    models (~10 ms of CPU, per candidate persona and per user); so an unbound prototype is kept
    per prompt shape (instructions, tool descriptions), and each agent gets a copy with fresh
    predictors and its own tools."""
    key = (task, instructions, max_iters, tuple(str(t) for t in tools))
    prototype = _prototypes.get(key)
    if prototype is None:
        unbound = [t.model_copy(update={"func": _unbound}) for t in tools]  # the cache holds no user's data
        signature = typed_to(TaskAnswer, task, instructions)
        prototype = _ReAct(signature, tools=unbound, max_iters=max_iters)
        # DSPy types the step's tool arguments as an open mapping; typed to the arguments the tools
        # really take, a schema-constrained model cannot invent one (a small model otherwise
        # writes long made-up arguments, and the error's traceback then bloats the next prompt).
        prototype.react.signature = prototype.react.signature.with_updated_fields(
            "next_tool_args", type_=tool_arguments(unbound))
        # The steps already carry thoughts; extracting the answer needs no second reasoning pass,
        # so `extract` (a public attribute) is DSPy's extraction signature without ChainOfThought.
        prototype.extract = dspy.Predict(signature.append("trajectory", dspy.InputField(), type_=str))
        if len(_prototypes) >= 1024:
            _prototypes.clear()
        _prototypes[key] = prototype
    react = copy.deepcopy(prototype)
    react.tools.update({t.name: t for t in tools})
    return react


_JSON_TYPES = {"string": str, "integer": int, "number": float, "boolean": bool}


def tool_arguments(tools: list[dspy.Tool]) -> type:
    """A TypedDict of every argument the tools take (all optional): what a step may pass."""
    fields = {name: _JSON_TYPES.get(schema.get("type"), Any) for tool in tools for name, schema in tool.args.items()}
    return TypedDict("ToolArgs", fields, total=False)


def _unbound(**kwargs):
    raise RuntimeError("a prototype's tool was called; agents bind their own tools")


class RetrievalAnswer(dspy.Module):
    """RAG and PAG: retrieve the user's top-k interactions and answer in one call, no tools.

    With a profile in the persona's slot this is PAG, with the neutral persona RAG.
    """

    def __init__(self, persona: Persona, memory: UserMemory):
        super().__init__()
        self.memory, self.persona = memory, persona
        self.answer = dspy.Predict(typed_to(TaskAnswer, persona.task, persona.render()))

    def with_persona(self, persona: Persona) -> "RetrievalAnswer":
        return RetrievalAnswer(persona, self.memory)

    def forward(self, query: str) -> dspy.Prediction:
        task = self.persona.task
        recalls = self.memory.search(task.query_content(query))
        return self.answer(query=query, memories=format_recalls(recalls), demos=recall_demos(task, recalls))


class Direct(dspy.Module):
    """One call under an instruction and nothing else: no memory, no tools, no retrieval.

    With the neutral persona this is the non-personalized baseline; with a persona it is
    "w/o action" (the persona alone)."""

    def __init__(self, persona: Persona):
        super().__init__()
        self.persona = persona
        self.answer = dspy.Predict(typed_to(PlainAnswer, persona.task, persona.render()))

    @property
    def task(self) -> Task:
        return self.persona.task

    def with_persona(self, persona: Persona) -> "Direct":
        return Direct(persona)

    def forward(self, query: str) -> dspy.Prediction:
        return self.answer(query=query)


def non_personalized(task: Task) -> Direct:
    """The baseline: the same task instruction and label set, no memory, no persona."""
    return Direct(Persona.neutral(task))


class Lookup(dspy.Module):
    """Copying, with no LLM: the label of the history item most like the query (see
    `data.calibration.lookup`). What copying alone reaches: a floor for what a number can mean."""

    def __init__(self, task: Task, history: list[tuple[str, str | None]]):
        super().__init__()
        self.task, self.history = task, history

    def forward(self, query: str) -> dspy.Prediction:
        return dspy.Prediction(answer=lookup(self.task, query, self.history))


class InContext(dspy.Module):
    """ICL: the user's latest k interactions (`dspy.Example(query, answer)`, oldest first) as
    demonstrations, whatever the query."""

    def __init__(self, task: Task, examples, k: int):
        super().__init__()
        self.task = task
        self.answer = dspy.Predict(typed_to(PlainAnswer, task, instruction(task)))
        self.answer.demos = [dspy.Example(query=ex.query, answer=ex.answer) for ex in list(examples)[-k:]] if k else []

    def forward(self, query: str) -> dspy.Prediction:
        return self.answer(query=query)


def recall_demos(task: Task, recalls) -> list[dspy.Example]:
    """Recalled interactions as few-shot demonstrations, most similar last."""
    return [dspy.Example(query=task.make_input(r.item.text, task.labels), answer=r.item.response)
            for r in reversed(recalls) if r.item.response is not None]
