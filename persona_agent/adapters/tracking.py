"""MLflow: the store under `mlruns/`, one run per command, traces on request."""

from __future__ import annotations

import contextlib
import errno
import os
import shlex
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import mlflow
from filelock import FileLock
from mlflow.tracing.constant import TraceMetadataKey

from persona_agent.pipelines import spans
from persona_agent.settings import Settings, sqlite_file


def setup(settings: Settings) -> str:
    """Point MLflow at the store and make sure the experiment exists; returns its id.

    With a local database the experiment gets an explicit artifact location inside the store, or
    artifacts would land relative to whatever directory the command runs from; a tracking server
    keeps them where it was told to (`--artifacts-destination`), so every client can read them.
    """
    settings.store.mkdir(parents=True, exist_ok=True)
    link_store(settings)
    if (database := sqlite_file(settings.tracking_uri)) is not None:
        if "mode=ro" not in settings.tracking_uri:  # a store opened read-only is never created
            _create_database(database, settings.artifacts_path)
    mlflow.set_tracking_uri(settings.tracking_uri)
    exp = mlflow.get_experiment_by_name(settings.experiment)
    if exp is None:
        # a local database: artifacts in the store; a tracking server: wherever it keeps (or proxies) them
        remote = settings.tracking_uri.startswith(("http://", "https://", "databricks"))
        artifacts = None if remote else settings.artifacts_path.as_uri()
        exp_id = mlflow.create_experiment(settings.experiment, artifact_location=artifacts)
    else:
        exp_id = exp.experiment_id
    mlflow.set_experiment(experiment_id=exp_id)
    close_abandoned_runs(exp_id)
    return exp_id


def run_params(settings: Settings, task_key: str, lm=None, **extra) -> dict[str, object]:
    """The parameters every run and child run carries, under the same names in every command,
    so the MLflow UI compares runs of `eval`, `demo`, `sweep` and `nightly` side by side. With
    the run's `lm`, `answer_step` is the one in effect: "prompt (why)" where the LM cannot score."""
    from persona_agent.adapters.llm import answer_step_in_effect

    return {"task": task_key, "lm": settings.lm.model, "api_base": settings.lm.api_base or "",
            "temperature": settings.lm.temperature, "max_tokens": settings.lm.max_tokens, "top_k": settings.top_k,
            "batch_size": settings.batch_size, "iterations": settings.iterations, "max_iters": settings.max_iters,
            "answer_step": answer_step_in_effect(settings, lm) if lm is not None else settings.answer_step, "prior_strength": settings.prior_strength,
            "support_margin": settings.support_margin,
            "loss": settings.loss, "guard": settings.guard, "acceptance": settings.acceptance if settings.guard else "paper", "holdout": settings.holdout,
            "redraw_temperature": settings.redraw_temperature,
            "profile_items": settings.profile_items, **extra}


def data_fingerprint(users) -> str:
    """Changes exactly when the evaluated data does: the task, and each user's history, queries,
    golds and planted rule. Content only, in a fixed order, so the same data gives the same
    fingerprint in every process (a `Task` holds functions: their text would be their address)."""
    import hashlib
    import json

    rows = sorted(json.dumps({"task": u.task.key, "labels": list(u.task.labels), "user": u.user_id, "unit": u.unit,
                              "profile": u.history, "queries": [[q.id, q.input, q.gold] for q in u.queries],
                              "rule": u.rule}, sort_keys=True, default=str) for u in users)  # str: a value
    # a loader kept in a non-JSON type (a numpy number from a saved dataset) is its content
    return hashlib.sha256("\n".join(rows).encode()).hexdigest()[:16]


def ui_hint() -> str:
    """How to look at the runs, to paste as printed from any directory."""
    uri = mlflow.get_tracking_uri()
    if uri.startswith(("http://", "https://")):
        return f"open {uri}"
    return f"see it: mlflow ui --backend-store-uri {shlex.quote(uri)} --port 5000"


def run_name(command: str, task_key: str, settings: Settings | None = None, *, users: int | None = None,
             lm=None) -> str:
    """A top-level run's name, distinct in the runs list: the command, the task, the settings an
    engineer varies between two runs (the answer step in effect with `lm`, T, n, K, users), and
    the minute it started. `tags.command` and `params.task` select runs; the name is for reading."""
    from persona_agent.adapters.llm import answer_step_in_effect

    parts = [command, task_key]
    if settings is not None:
        step = answer_step_in_effect(settings, lm).split()[0] if lm is not None else settings.answer_step
        parts += [step, f"T{settings.iterations}", f"n{settings.batch_size}", f"k{settings.top_k}"]
    if users is not None:
        parts.append(f"{users}u")
    return "-".join([*parts, time.strftime("%m%d-%H%M")])


def owner_tags(command: str = "") -> dict[str, str]:
    """Tags of every top-level run: which command made it, and which process on which host owns
    it while it is RUNNING."""
    return {OWNER_HOST: socket.gethostname(), OWNER_PID: str(os.getpid()), **({COMMAND: command} if command else {})}


OWNER_HOST, OWNER_PID, COMMAND = "persona_agent.host", "persona_agent.pid", "command"


def close_abandoned_runs(experiment_id: str) -> list[str]:
    """Mark KILLED the runs still RUNNING whose process (on this host) is gone: a command that was
    killed never ended its run, and MLflow would show it running forever."""
    client, closed = mlflow.MlflowClient(), []
    for run in client.search_runs([experiment_id], filter_string="attributes.status = 'RUNNING'", max_results=1000):
        tags = run.data.tags
        if tags.get(OWNER_HOST) == socket.gethostname() and not _alive(int(tags.get(OWNER_PID, "0") or 0)):
            client.set_terminated(run.info.run_id, "KILLED")
            closed.append(run.info.run_id)
    return closed


def _alive(pid: int) -> bool:
    if pid <= 0:
        return True  # not ours to judge
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def link_store(settings: Settings) -> None:
    """A store whose path holds `%`, `?` or `#` is reached through a plain-named link in the
    user's cache (`Settings.database_path`): made here, by every process that opens the
    registry (a command, a served model), before anything reads the tracking URI."""
    if settings.database_path.parent != settings.store.resolve():
        _link(settings.database_path.parent, settings.store.resolve())


def _link(alias: Path, target: Path) -> None:
    """`alias` -> `target`, made or repointed atomically (two commands may do it at once)."""
    if alias.is_symlink() and alias.resolve() == target:
        return
    if alias.is_dir() and not alias.is_symlink():  # an earlier release's served model made a database here
        if any(p.stat().st_size for p in alias.rglob("*") if p.is_file()):
            raise IsADirectoryError(errno.EISDIR, f"a folder with data where the link to {target} belongs; move it "
                                    "aside", str(alias))
        shutil.rmtree(alias)
    alias.parent.mkdir(parents=True, exist_ok=True)
    tmp = alias.with_name(f".{alias.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(target, target_is_directory=True)
    os.replace(tmp, alias)


def _create_database(path: Path, artifacts: Path) -> None:
    """Create MLflow's database atomically: its schema takes ~50 migrations, and a process
    killed half-way through them would leave a database no later run can open. So the schema
    is built in a temporary file, which replaces the real path only once complete."""
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, "a folder where MLflow's database should be", str(path))
    if path.exists():
        return
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    with FileLock(str(path) + ".lock"):
        if path.exists():  # another process created it while we waited
            return
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.unlink(missing_ok=True)
        try:
            SqlAlchemyStore(f"sqlite:///{tmp}", artifacts.as_uri()).engine.dispose()
            os.replace(tmp, path)
        finally:  # a full disk or a kill half-way: no half-built database left beside the store
            tmp.unlink(missing_ok=True)


def enable_traces() -> None:
    """Trace the command's units of work (`trace`), with a span per DSPy module and LM call inside."""
    global _tracing
    import mlflow.dspy

    # our alignment is a DSPy `compile`: MLflow drops traces made inside one unless told otherwise
    mlflow.dspy.autolog(log_traces=True, log_traces_from_compile=True, log_compiles=False, log_evals=False, silent=True)
    spans.install(_child_span)
    _tracing = True


def disable_traces() -> None:
    """Undo `enable_traces` (a process that runs several commands, such as a test session)."""
    global _tracing
    import mlflow.dspy

    mlflow.dspy.autolog(disable=True)
    spans.install(None)
    _tracing = False


@contextlib.contextmanager
def _child_span(name: str, attributes: dict) -> Iterator[None]:
    """A child span of the active span, if there is one (inside a `trace`); nothing otherwise."""
    if mlflow.get_current_active_span() is None:
        yield
        return
    with mlflow.start_span(name=name) as s:
        s.set_attributes(attributes)
        yield


_tracing = False


@contextlib.contextmanager
def trace(name: str, run_id: str | None = None, **tags) -> Iterator[list[str]]:
    """One trace per unit of work (a user's night, one method's answer to one query, a served
    answer), when the command was asked for traces: DSPy's module and LM-call spans and the
    alignment's replay, critique and update spans hang under it, and `tags` (user, method, task,
    persona version) say whose work it is. `run_id`: the run it belongs to (else the run active
    in this process, if any); where that run does not exist yet, the list this yields holds the
    trace's id, to link it once it does (`link_traces`)."""
    ids: list[str] = []
    if not _tracing:
        yield ids
        return
    with mlflow.start_span(name=name) as root:
        ids.append(root.trace_id)
        root.set_inputs(tags)  # what the UI's trace list shows as the request
        mlflow.update_current_trace(tags={k: str(v) for k, v in tags.items() if v is not None},
                                    metadata={TraceMetadataKey.SOURCE_RUN: run_id} if run_id else None)
        yield ids


def flush_traces() -> None:
    """Write the traces still queued (MLflow logs them in the background): a command ends with
    its traces in the store, where the next command or the UI looks."""
    if _tracing:
        mlflow.flush_trace_async_logging()


def link_traces(trace_ids: list[str], run_id: str) -> None:
    """Show the traces on the run's Traces tab (MLflow takes at most 100 per request). Traces are
    written in the background: they are flushed first, or a link to one not yet written is lost."""
    if not trace_ids:
        return
    mlflow.flush_trace_async_logging()
    client = mlflow.MlflowClient()
    for i in range(0, len(trace_ids), 100):
        client.link_traces_to_run(trace_ids[i:i + 100], run_id)


def tag_trace(trace_id: str, **tags) -> None:
    """Tags known only after the trace ended (the persona version a commit registered)."""
    client = mlflow.MlflowClient()
    for key, value in tags.items():
        if value is not None:
            client.set_trace_tag(trace_id, key, str(value))


def log_evaluation(rows: list[dict], scorers: list, run_id: str) -> None:
    """Scored rows where MLflow's Evaluations view shows them: `mlflow.genai.evaluate` on the
    answers already given (no predict_fn, so nothing is asked again and no number changes), on the
    run `run_id`. Each row: `inputs`, `outputs`, `expectations`, `tags` and a `query` id; a row
    whose query was traced (`--trace`) is scored on that trace, so the view opens the real spans.
    One worker: MLflow's default ten overrun a SQLite store's connection pool (traces are lost)."""
    if not rows:
        return
    traced = {}
    if _tracing:
        mlflow.flush_trace_async_logging()
        where = [mlflow.get_run(run_id).info.experiment_id]
        for t in mlflow.search_traces(run_id=run_id, locations=where, return_type="list"):
            if (query := t.info.tags.get("query")) and "setup" not in t.info.tags.get("mlflow.traceName", ""):
                traced[query] = t
    on_traces = all(r["query"] in traced for r in rows)  # one shape for the whole set: MLflow reads its columns
    # The answer is given beside its trace: the trace's root span holds no output (it wraps the
    # whole query), and MLflow would read a missing one as the answer None.
    data = [{"trace": traced[r["query"]], **{k: r[k] for k in ("inputs", "outputs", "expectations")}} if on_traces
            else {k: r[k] for k in ("inputs", "outputs", "expectations", "tags")} for r in rows]
    workers = os.environ.get("MLFLOW_GENAI_EVAL_MAX_WORKERS")
    os.environ["MLFLOW_GENAI_EVAL_MAX_WORKERS"] = workers or "1"  # for this call only: a caller's own evaluate keeps its
    try:
        with mlflow.start_run(run_id=run_id, nested=True):
            mlflow.genai.evaluate(data=data, scorers=scorers)
    finally:
        if workers is None:
            del os.environ["MLFLOW_GENAI_EVAL_MAX_WORKERS"]
