"""MLflow: the store under `mlruns/`, one run per command, and personas in the prompt registry."""

from __future__ import annotations

import hashlib
import re

import mlflow
import pandas as pd

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


def prompt_name(task_key: str, user_id: str) -> str:
    """Registry names allow letters, digits, '-', '_' and '.'; user ids may hold anything, so an
    id that had to be changed gets a hash suffix to stay unique."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", user_id)[:80]
    if safe != user_id:
        safe += "-" + hashlib.sha256(user_id.encode()).hexdigest()[:8]
    return f"persona.{task_key}.{safe}"


def register_persona(task_key: str, user_id: str, text: str, message: str, tags: dict) -> int:
    """Register a persona revision as the next version of the user's prompt; returns the version."""
    version = mlflow.genai.register_prompt(
        name=prompt_name(task_key, user_id), template=text, commit_message=message,
        tags={"user_id": user_id, "task": task_key, **{k: str(v) for k, v in tags.items()}},
    )
    return version.version


def persona_versions(task_key: str | None = None) -> pd.DataFrame:
    """Every registered persona version: prompt, version, user, task, tags, message."""
    client = mlflow.MlflowClient()
    prefix = f"persona.{task_key}." if task_key else "persona."
    rows = []
    for prompt in _pages(client.search_prompts, filter_string=f"name LIKE '{prefix}%'"):
        for v in _pages(client.search_prompt_versions, prompt.name):
            rows.append({"prompt": prompt.name, "version": v.version, "user_id": v.tags.get("user_id"),
                         "stage": v.tags.get("stage"), "batch_score": v.tags.get("batch_score"),
                         "message": v.commit_message})
    return pd.DataFrame(rows, columns=["prompt", "version", "user_id", "stage", "batch_score", "message"])


def _pages(search, *args, **kwargs):
    """Every item of a paged MLflow search."""
    token = None
    while True:
        page = search(*args, **kwargs, max_results=1000, page_token=token)
        yield from page
        token = page.token
        if not token:
            return
