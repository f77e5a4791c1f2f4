"""PersonaAlignment as an MLflow prompt optimizer, for `mlflow.genai.optimize_prompts`.

MLflow hands an optimizer an `eval_fn` (run the user's `predict_fn` under candidate prompt texts,
score each answer with the scorers) and registers a new version of every prompt the optimizer
returns, with no check of its own. So the alignment's guard decides here: a rewrite the
acceptance strategy rejects returns no prompt, and nothing is registered.

The alignment reaches the candidates only through `PersonaProgram` (`_Candidates` answers a
query by one `eval_fn` call) and scores them with the scorers' aggregate, so MLflow's scorers are
the metric. `predict_fn` runs in MLflow's worker threads, where our context variables are not
set: `persona_predict_fn` hides the replayed item from memory there itself (its `item_id` and
`hidden` inputs), as `replay` does in the nightly.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable

import dspy
import mlflow
from mlflow.genai.optimize.optimizers import BasePromptOptimizer
from mlflow.genai.optimize.types import EvaluationResultRecord, PromptOptimizerOutput

from persona_agent.data.tasks import Task
from persona_agent.optimizers.persona_alignment import PersonaAlignment, PersonaProgram, replay
from persona_agent.pipelines.memory import UserMemory
from persona_agent.pipelines.metering import answer_or_none
from persona_agent.pipelines.persona import Persona

log = logging.getLogger(__name__)

# How MLflow's eval_fn hands back a predict_fn that raised: as its output (optimize.py, _run_single).
FAILED = "Failed to invoke the predict_fn"


class PredictFailed(RuntimeError):
    """predict_fn raised (an LM error, a bug): MLflow returns that as an output string, and an LM
    error is never an answer, so the optimization stops and registers nothing."""


def train_data(examples) -> list[dict]:
    """A user's past interactions (`dspy.Example(query, answer, item_id, hidden)`, oldest first, as
    `UserFlow.trainset()` gives them) as `optimize_prompts` takes them."""
    return [{"inputs": {"query": ex.query, "item_id": ex.get("item_id") or "", "hidden": list(ex.get("hidden", ()))},
             "outputs": str(ex.answer)} for ex in examples]


def persona_predict_fn(prompt, program: PersonaProgram) -> Callable[..., str]:
    """The `predict_fn` for `optimize_prompts`: `program` under the persona the loaded prompt
    version holds (MLflow swaps each candidate in through `prompt.format()`), the replayed item
    hidden from memory. An answer that arrived and cannot be parsed is "" (logged, counted)."""
    task = program.persona.task

    def predict_fn(query: str, item_id: str = "", hidden: list | None = None) -> str:
        persona = Persona.parse(task, prompt.format())
        with UserMemory.excluding({*(hidden or ()), *([item_id] if item_id else [])}):
            return str(answer_or_none(program.with_persona(persona), query, f"replay of {item_id or '?'}") or "")

    return predict_fn


@dataclass
class _Seen:
    """Every eval_fn record by (prompt text, query): a persona is never run twice on a query."""

    name: str
    eval_fn: Callable[[dict[str, str], list[dict[str, Any]]], list[EvaluationResultRecord]]
    records: dict[str, dict]  # query -> its train_data record
    results: dict[tuple[str, str], EvaluationResultRecord] = field(default_factory=dict)

    def run(self, text: str, query: str) -> EvaluationResultRecord:
        if (text, query) not in self.results:
            [result] = self.eval_fn({self.name: text}, [self.records[query]])
            if isinstance(result.outputs, str) and result.outputs.startswith(FAILED):
                raise PredictFailed(result.outputs)
            if result.score is not None and not 0.0 <= result.score <= 1.0:
                raise ValueError(f"the scorers' aggregate is {result.score}, outside [0, 1], where the alignment "
                                 "reads 1 as a perfect batch: pass an `aggregation` that stays in it (MLflow's "
                                 "default averages the scorers)")
            self.results[(text, query)] = result
        return self.results[(text, query)]


class _Candidates:
    """A `PersonaProgram` whose answers are `eval_fn`'s: the user's own predict_fn under the persona."""

    def __init__(self, persona: Persona, seen: _Seen):
        self._persona, self.seen = persona, seen

    @property
    def persona(self) -> Persona:
        return self._persona

    def with_persona(self, persona: Persona) -> "_Candidates":
        return _Candidates(persona, self.seen)

    def __call__(self, *, query: str) -> dspy.Prediction:
        result = self.seen.run(self._persona.render(), query)
        return dspy.Prediction(answer=str(result.outputs), score=result.score)


class PersonaPromptOptimizer(BasePromptOptimizer):
    """`mlflow.genai.optimize_prompts(..., optimizer=PersonaPromptOptimizer(task, alignment))`:
    one user's persona prompt, aligned on `train_data` (their interactions, oldest first; the
    latest `alignment.batch_size` are the batch) with `alignment`'s loop and acceptance. Returns
    the rewrite only when it was accepted; `steps` holds every iteration of the last run. The
    scores are the batch's mean aggregate score, before and after (equal when nothing shipped)."""

    def __init__(self, task: Task, alignment: PersonaAlignment):
        self.task, self.alignment, self.steps = task, alignment, []

    def optimize(self, eval_fn, train_data: list[dict[str, Any]], target_prompts: dict[str, str],
                 enable_tracking: bool = True) -> PromptOptimizerOutput:
        if eval_fn is None or not train_data:
            raise ValueError("PersonaPromptOptimizer needs train_data: the user's past interactions, oldest first")
        if len(target_prompts) != 1:
            raise ValueError(f"PersonaPromptOptimizer aligns one user's persona: got {len(target_prompts)} prompts")
        [(name, text)] = target_prompts.items()
        # A candidate is asked by query text alone (`PersonaProgram`): a text asked twice keeps its
        # latest record, the user's latest answer to it.
        latest = {r["inputs"]["query"]: i for i, r in enumerate(train_data)}
        if len(latest) < len(train_data):
            log.info("train_data: %d records repeat a later one's query; the latest of each is kept",
                     len(train_data) - len(latest))
        kept = [train_data[i] for i in sorted(latest.values())]
        records = {r["inputs"]["query"]: r for r in kept}
        trainset = [dspy.Example(query=r["inputs"]["query"], answer=_gold(r)) for r in kept]
        seen = _Seen(name, eval_fn, records)
        start = _Candidates(Persona.parse(self.task, text), seen)
        metric = self.alignment.metric or _score_of(self.task)
        on_step = self.alignment.on_step
        if enable_tracking:
            self.alignment.on_step = lambda step: (_log_step(step), on_step and on_step(step))
        try:
            aligned = self.alignment.compile(start, trainset=trainset)
        finally:
            self.alignment.on_step = on_step
        self.steps = list(aligned.alignment_steps)
        batch = trainset[-self.alignment.batch_size:]
        before, after = replay(start, batch, metric), replay(aligned, batch, metric)  # from `seen`: no new calls
        shipped = aligned.persona.profile != start.persona.profile
        log.info("%s: %s", name, "a rewrite was accepted" if shipped else "no rewrite was accepted; nothing to register")
        return PromptOptimizerOutput(
            optimized_prompts={name: aligned.persona.render()} if shipped else {},
            initial_eval_score=before.score, final_eval_score=after.score,
            initial_eval_score_per_scorer=_per_scorer(seen, start.persona.render(), batch),
            final_eval_score_per_scorer=_per_scorer(seen, aligned.persona.render(), batch))


def _gold(record: dict) -> str:
    expectations = record.get("expectations") or {}
    return str(expectations.get("expected_response", record.get("outputs")))


def _score_of(task: Task):
    """The metric the alignment scores by: the scorers' aggregate, or the task's own score when
    `optimize_prompts` was given no scorers."""

    def metric(example, prediction, trace=None) -> float:
        score = getattr(prediction, "score", None)
        return score if score is not None else task.example_score(example.answer, prediction.answer)

    return metric


def _per_scorer(seen: _Seen, text: str, batch) -> dict[str, float]:
    results = [seen.results[(text, ex.query)] for ex in batch if (text, ex.query) in seen.results]
    names = {n for r in results for n in r.individual_scores}
    return {n: sum(r.individual_scores.get(n, 0.0) for r in results) / len(results) for n in sorted(names)}


def _log_step(step) -> None:
    """Each iteration on the optimization's run, at step = the iteration."""
    metrics = {"batch_score": step.batch_score, "accepted": float(step.accepted), "lm_calls": step.lm_calls}
    if step.candidate_score is not None:
        metrics["candidate_score"] = step.candidate_score
    mlflow.log_metrics(metrics, step=step.iteration)
