"""MLflow: the store under `mlruns/`, one run per command, traces on request."""

from __future__ import annotations

import mlflow

from .config import Settings


def setup(settings: Settings) -> str:
    """Point MLflow at the store and make sure the experiment exists; returns its id.

    The experiment gets an explicit artifact location inside the store, or artifacts would land
    relative to whatever directory the command runs from.
    """
    settings.store.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(settings.tracking_uri)
    exp = mlflow.get_experiment_by_name(settings.experiment)
    if exp is None:
        artifacts = (settings.store.resolve() / "artifacts").as_uri()
        exp_id = mlflow.create_experiment(settings.experiment, artifact_location=artifacts)
    else:
        exp_id = exp.experiment_id
    mlflow.set_experiment(experiment_id=exp_id)
    return exp_id


def enable_traces() -> None:
    """Trace every agent call (spans per module and LM call) into the active experiment."""
    import mlflow.dspy

    mlflow.dspy.autolog(log_traces=True, log_compiles=False, log_evals=False, silent=True)
