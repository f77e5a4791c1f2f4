"""Every user's persona agent as one MLflow model: `user_id` + `query` in, the answer of that
user's `production` persona out.

The model holds no persona. Each prediction reads the user's current `production` version from
the registry and their memory from the store, so a new production version (tonight's alignment,
a rollback) is served at once, without logging the model again. Where the store, the registry
and the LLM are is model config, set when the model is logged and overridable when it is loaded
(`mlflow.pyfunc.load_model(uri, model_config={"store": ...})`); API keys come from the serving
environment, as for the CLI.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shlex
import warnings
from dataclasses import asdict, replace
from pathlib import Path

import mlflow
import pandas as pd

from persona_agent.settings import LMConfig, Settings

SIGNATURE = mlflow.models.ModelSignature(
    inputs=mlflow.types.Schema([mlflow.types.ColSpec("string", "user_id"), mlflow.types.ColSpec("string", "query")]),
    outputs=mlflow.types.Schema([mlflow.types.ColSpec("string", "answer", required=False)]))


_log = logging.getLogger("persona_agent.serving")


class PersonaModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        from persona_agent.adapters.llm import build_lm
        from persona_agent.data.tasks import get_task

        config = dict(context.model_config)
        self.task = get_task(config.pop("task"))
        if isinstance(config.get("lm"), dict):  # a model logged before the config was flat
            nested = config.pop("lm")
            config.update({k: v for k, v in nested.items() if k != "model"}, lm=nested["model"])
        lm = LMConfig(model=config.pop("lm"), **{k: config.pop(k) for k in _LM_FIELDS if k in config})
        lm = replace(lm, api_base=lm.api_base or None)
        self.settings = replace(Settings(), lm=lm, store=Path(config.pop("store")),
                                **{**config, "qdrant_url": config.get("qdrant_url") or None})
        self.lm = build_lm(lm)
        from persona_agent.adapters.tracking import link_store

        link_store(self.settings)  # a store whose path holds `%`, `?` or `#`: its registry is read through a link

    def predict(self, context, model_input: pd.DataFrame, params=None) -> list[str | None]:
        """One answer per row; None for a row whose user has no persona or whose answer was unusable."""
        from persona_agent.pipelines.metering import or_fallback
        from persona_agent.runtime.store import Store
        from persona_agent.serving.answer import answer

        frame = pd.DataFrame(model_input)  # MLflow has checked the columns against the signature
        with Store.open(self.settings, memory="persistent", tracking=False) as store:
            registry = store.registry(self.task)

            def one(user_id: str, query) -> str | None:
                if query is None or pd.isna(query) or not str(query).strip():  # no question: no answer
                    _log.warning("%s user %r: empty query: answered null", self.task.key, user_id)
                    return None
                if registry.production_version(user_id) is None:
                    _log.warning("%s user %r has no production persona: answered null", self.task.key, user_id)
                    return None
                return or_fallback(lambda: answer(store, self.task, user_id, query=str(query), lm=self.lm), None,
                                   f"user {user_id}: served answer")
            return [one(str(u), q) for u, q in zip(frame["user_id"], frame["query"])]


_LM_FIELDS = ("api_base", "temperature", "max_tokens", "retries", "timeout", "cache")


def model_config(settings: Settings, task_key: str) -> dict:
    """Flat, under the parameter names every run uses (`lm`, `api_base`, `top_k`, ...): MLflow
    logs a model's config as its run's parameters, so the served model's run compares with the
    others; no value is None (it would read "None" beside other runs' "")."""
    lm = asdict(settings.lm)
    return {"task": task_key, "store": str(settings.store.resolve()), "qdrant_url": settings.qdrant_url or "",
            "lm": lm["model"], **{k: lm[k] if lm[k] is not None else "" for k in _LM_FIELDS},
            "top_k": settings.top_k, "max_iters": settings.max_iters, "answer_step": settings.answer_step,
            "prior_strength": settings.prior_strength, "support_margin": settings.support_margin,
            "store_wait": settings.store_wait}


def log_model(settings: Settings, task_key: str, registered_name: str | None = None) -> str:
    """Log the served model in a run of its own; returns its model URI."""
    from persona_agent.adapters import tracking

    with mlflow.start_run(run_name=f"served-model-{task_key}", tags=tracking.owner_tags("log-model")), _quiet_logging():
        # no input example: MLflow would run a prediction (the LLM, the store) while logging;
        # requirements listed, not inferred: inferring them loads the model in a subprocess
        info = mlflow.pyfunc.log_model(name="persona-agent", python_model=PersonaModel(), signature=SIGNATURE,
                                       model_config=model_config(settings, task_key),
                                       pip_requirements=["mlflow", "dspy", "qdrant-client", "pandas"],
                                       registered_model_name=registered_name)
    return info.model_uri


@contextlib.contextmanager
def _quiet_logging():
    """MLflow warns that the model is pickled and has no input example: both are deliberate here
    (see above), so the warnings would be noise on every `log-model`."""
    pyfunc_log = logging.getLogger("mlflow.pyfunc")
    level = pyfunc_log.level
    pyfunc_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="An input example was not provided")
            yield
    finally:
        pyfunc_log.setLevel(level)


def serve_instructions(settings: Settings, model_uri: str, task, *, user_id: str | None, port: int = 5001) -> str:
    """The commands that serve the logged model and ask it one question, to paste as printed from
    any directory: `models:/<id>` is resolved through the tracking store, so the command names it
    (without it, MLflow would look in a new `mlflow.db` in the current directory)."""
    serve = (f"MLFLOW_TRACKING_URI={shlex.quote(settings.tracking_uri)} mlflow models serve -m {shlex.quote(model_uri)} "
             f"--env-manager local --port {port}")
    if user_id is None:
        return f"serve it:\n  {serve}\nno {task.key} user has a production persona yet: run `persona-agent nightly` first"
    from persona_agent.data.loaders import load_users
    from persona_agent.data.synthetic import shipped_data_dir

    example = load_users(shipped_data_dir(task), task)[0].queries[0].input  # a request in the task's format
    body = json.dumps({"dataframe_records": [{"user_id": user_id, "query": example}]})
    ask = (f"curl -s http://127.0.0.1:{port}/invocations -H 'Content-Type: application/json' -d {shlex.quote(body)}")
    return f"serve it:\n  {serve}\nthen ask it (another shell):\n  {ask}"
