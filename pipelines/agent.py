"""The persona-conditioned agent and the non-personalized baseline.

`PersonaAgent` is one user's program: the persona is the instruction of its ReAct answering
predictors, its tools reach only that user's memory and profile, and its answer is typed to the
task's label set. DSPy optimizers (ours included) therefore see an ordinary module whose
instructions they can read and rewrite.
"""

from __future__ import annotations

import copy
import functools

import dspy

from persona_agent.eval.tasks import Task
from persona_agent.signatures import FormulateMemoryQuery, PlainAnswer, TaskAnswer, typed_to

from .memory import UserMemory, format_recalls
from .persona import Persona


class PersonaAgent(dspy.Module):
    def __init__(self, persona: Persona, memory: UserMemory, *, max_iters: int, formulate_query: bool = False,
                 prefetch: bool = True):
        """`formulate_query`: have the LM write the upfront memory query (for inputs whose item text
        the task cannot cut out by pattern) instead of searching with the item text.
        `prefetch=False`: no upfront retrieval; memory is reached through the tools only."""
        super().__init__()
        self.memory, self.max_iters, self.prefetch = memory, max_iters, prefetch
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
        self.act = _react(persona.task, persona.render(), self.max_iters, self.tools(persona))

    def tools(self, persona: Persona) -> list[dspy.Tool]:
        """The agent's tools, over this user's data only. Override to add your own."""
        return memory_tools(self.memory, persona)

    def forward(self, query: str) -> dspy.Prediction:
        recalls = self.memory.search(self._search_text(query)) if self.prefetch else []
        shown = format_recalls(recalls) if self.prefetch else "(none retrieved up front: use search_memory)"
        # The recalled interactions are also few-shot demonstrations: the answer step sees the
        # user's own choices in the very shape it must produce.
        pred = self.act(query=query, memories=shown, demos=recall_demos(self.task, recalls))
        return dspy.Prediction(answer=pred.answer, trajectory=pred.trajectory,
                               memories=[r.item.item_id for r in recalls])

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


def memory_tools(memory: UserMemory, persona: Persona) -> list[dspy.Tool]:
    # Closures over values, not over the agent: a deep copy of the program must not reach back
    # into the original's persona.
    task, profile = persona.task, persona.profile

    def search_memory(query: str) -> str:
        """Search this user's own past interactions; returns similar items with the user's responses."""
        return format_recalls(memory.search(task.query_content(query)))

    def user_profile() -> str:
        """This user's profile: their stable preferences."""
        return profile

    return [dspy.Tool(search_memory), dspy.Tool(user_profile)]


class _ReAct(dspy.ReAct):
    def _format_trajectory(self, trajectory: dict) -> str:
        # dspy.ReAct builds a signature per step just to format the trajectory; build one per shape.
        # A private method with no public alternative: tests/test_agent.py fails loudly if DSPy
        # stops calling it or changes its shape.
        adapter = dspy.settings.adapter or dspy.ChatAdapter()
        return adapter.format_user_message_content(_trajectory_signature(tuple(trajectory)), trajectory)


@functools.lru_cache(maxsize=64)
def _trajectory_signature(keys: tuple[str, ...]) -> type[dspy.Signature]:
    return dspy.Signature(f"{', '.join(keys)} -> x")


_prototypes: dict[tuple, _ReAct] = {}


def _react(task: Task, instructions: str, max_iters: int, tools: list[dspy.Tool]) -> _ReAct:
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
        # The steps already carry thoughts; extracting the answer needs no second reasoning pass,
        # so `extract` (a public attribute) is DSPy's extraction signature without ChainOfThought.
        prototype.extract = dspy.Predict(signature.append("trajectory", dspy.InputField(), type_=str))
        if len(_prototypes) >= 1024:
            _prototypes.clear()
        _prototypes[key] = prototype
    react = copy.deepcopy(prototype)
    react.tools.update({t.name: t for t in tools})
    return react


def _unbound(**kwargs):
    raise RuntimeError("a prototype's tool was called; agents bind their own tools")


class RetrievalAnswer(dspy.Module):
    """RAG and PAG: retrieve the user's top-k interactions and answer in one call, no tools.

    With a profile in the persona's slot (SUMMARY_TEMPLATE) this is PAG, without one RAG.
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


class InContext(dspy.Module):
    """ICL: the user's latest k interactions (`dspy.Example(query, answer)`, oldest first) as
    demonstrations, whatever the query."""

    def __init__(self, task: Task, examples, k: int):
        super().__init__()
        self.task = task
        self.answer = dspy.Predict(typed_to(PlainAnswer, task, f"Answer the request as this user would: {task.description}."))
        self.answer.demos = [dspy.Example(query=ex.query, answer=ex.answer) for ex in list(examples)[-k:]] if k else []

    def forward(self, query: str) -> dspy.Prediction:
        return self.answer(query=query)


def recall_demos(task: Task, recalls) -> list[dspy.Example]:
    """Recalled interactions as few-shot demonstrations, most similar last."""
    return [dspy.Example(query=task.make_input(r.item.text, task.labels), answer=r.item.response)
            for r in reversed(recalls) if r.item.response is not None]


class NonPersonalized(dspy.Module):
    """The baseline: the same task and label set, no memory, no persona."""

    def __init__(self, task: Task):
        super().__init__()
        self.task = task
        self.answer = dspy.Predict(typed_to(PlainAnswer, task, f"Answer the request: {task.description}."))

    def forward(self, query: str) -> dspy.Prediction:
        return self.answer(query=query)
