"""The task metrics as MLflow scorers: what `optimize_prompts` aligns by and what eval's rows
are scored with in MLflow's Evaluations view, the same per-answer score eval reports."""

from __future__ import annotations

from mlflow.genai.scorers import Scorer, scorer

from persona_agent.data.tasks import Task


def task_scorer(task: Task) -> Scorer:
    """The task's per-answer score as an MLflow scorer (`<task>_score`: 1 for the user's label, or
    1 - |rating error| / 4), reading the gold where `optimize_prompts` and `evaluate` put it."""

    @scorer(name=f"{task.key}_score")
    def score(outputs, expectations) -> float:
        gold = expectations.get("expected_response") if isinstance(expectations, dict) else expectations
        return float(task.example_score(str(gold), None if outputs is None else str(outputs)))

    return score
