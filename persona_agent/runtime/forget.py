"""Forgetting a user: every byte the store, the tracking store and the LM cache hold of them.

What a user leaves behind, and how each is removed:
- memories: their points, by rebuilding the Edge shard without them (a deleted point's bytes
  would stay in its pages and the write-ahead log); on a Qdrant server, deleted by filter;
- personas: their prompt in every task, every version;
- nightly state: their file in every task;
- MLflow runs: a run of their own (the demo's per-user runs) is deleted whole; in every other
  run's artifacts (`predictions.json`, `prequential.json`, `users.csv`, `personas.json`,
  `results/`, ...) the rows that name them are dropped and the file is written back;
- traces tagged with them;
- LM answers cached for their work (`lm_cache.owned_by` tags them on disk);
- the files eval, report and sweep keep in the store, rows dropped as in artifacts.
Then SQLite's free pages are compacted (`VACUUM`), so deleted rows leave no bytes, and the
erasure is recorded in `<store>/forgotten.jsonl`: a salted hash of the id, the time and the
counts, never the user's id or text. Running it again finds nothing and records that.

Runs against a tracking server are deleted through its API; the server keeps them in its
trash until its operator runs `mlflow gc` (said in the result).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import re
import secrets
import sqlite3
import tempfile
import time
from collections import Counter
from pathlib import Path

import mlflow
import pandas as pd
from mlflow.entities import ViewType
from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository
from qdrant_client import QdrantClient

from persona_agent.data.atomic import atomic_write_text
from persona_agent.data.tasks import TASKS
from persona_agent.overrides import purge_run
from persona_agent.pipelines.points import ClientPoints, EdgePoints
from persona_agent.runtime import lm_cache
from persona_agent.runtime.registry import PersonaRegistry, prompt_name
from persona_agent.runtime.settings import Settings, sqlite_file
from persona_agent.runtime.state import StateStore
from persona_agent.runtime.store import exclusive

log = logging.getLogger(__name__)
TABLES = (".json", ".csv", ".jsonl", ".md", ".txt")  # the artifact and output files rows are dropped from
OUTPUTS = ("eval", "reports", "sweeps")  # folders of the store where commands write their tables


def forget(settings: Settings, user_id: str) -> Counter:
    """Remove everything of `user_id`; returns what was removed, by kind."""
    removed = Counter()
    with exclusive(settings):  # no nightly commits them again meanwhile, no ingest adds to them
        removed["memories"] = _forget_memory(settings, user_id)
        states = StateStore(settings.state_db, "")
        removed["nightly states"] = states.delete(user_id) + _forget_state_files(settings, user_id)
        states.compact()
        removed["persona versions"] = sum(PersonaRegistry(task, settings.tracking_uri).delete(user_id)
                                          for task in TASKS.values())
        removed += _forget_runs(settings, user_id)
        removed["output rows"] = sum(_drop_rows(p, user_id) for d in OUTPUTS for p in _tables(settings.store / d))
        removed["cached LM answers"] = lm_cache.evict(user_id)
        if (database := sqlite_file(settings.tracking_uri)) is not None and database.exists():
            with contextlib.closing(sqlite3.connect(database, timeout=60)) as db:  # deleted rows leave no bytes
                db.execute("VACUUM")
        _record(settings.store, user_id, removed)
    return +removed


def _forget_state_files(settings: Settings, user_id: str) -> int:
    """An earlier version's state file of the user (a store not yet migrated into `state.db`)."""
    name = hashlib.sha256(user_id.encode()).hexdigest()[:32] + ".json"
    files = list((settings.store / "nightly").glob(f"*/{name}"))
    for path in files:
        path.unlink()
    return len(files)


def _forget_memory(settings: Settings, user_id: str) -> int:
    if settings.qdrant_url:
        client = QdrantClient(url=settings.qdrant_url)
        try:
            return ClientPoints(client).delete_user(user_id)
        finally:
            client.close()
    if not (settings.qdrant_path / "edge_config.json").exists():
        return 0
    points = EdgePoints(settings.qdrant_path)
    try:
        return points.delete_user(user_id)
    finally:
        points.close()


def _forget_runs(settings: Settings, user_id: str) -> Counter:
    client, removed = mlflow.MlflowClient(settings.tracking_uri), Counter()
    experiments = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ALL)]
    local = sqlite_file(settings.tracking_uri) is not None
    for run in _every_run(client, experiments):
        tags = run.data.tags
        if tags.get("user_id") == user_id or (run.info.run_name == user_id and "mlflow.parentRunId" in tags):
            client.delete_run(run.info.run_id)
            if local:  # a local store deletes for good; a server keeps it in its trash until `mlflow gc`
                purge_run(settings.tracking_uri, run.info.run_id)
            removed["runs"] += 1
            continue
        for path in _artifact_files(client, run.info.run_id):
            removed["artifact rows"] += _drop_artifact_rows(settings.tracking_uri, run.info.run_id, path, user_id)
        removed["run tags"] += _redact_tags(client, run, user_id)
    for experiment in experiments:
        traces = _traces(experiment, user_id)
        for i in range(0, len(traces), 100):
            client.delete_traces(experiment, trace_ids=[t.trace_id for t in traces[i:i + 100]])
        for trace in traces:  # a deleted trace's rows go; its spans, kept as an artifact, stay unless removed
            if location := trace.tags.get("mlflow.artifactLocation"):
                with contextlib.suppress(Exception):  # none written
                    get_artifact_repository(location).delete_artifacts()
        removed["traces"] += len(traces)
    if removed["runs"] and not local:
        removed["runs left in the server's trash (`mlflow gc` there)"] = removed["runs"]
    return removed


def _every_run(client, experiments):
    token = None
    while True:
        page = client.search_runs(experiments, run_view_type=ViewType.ALL, max_results=1000, page_token=token)
        yield from page
        token = page.token
        if not token:
            return


def _artifact_files(client, run_id: str, path: str | None = None) -> list[str]:
    out = []
    for item in client.list_artifacts(run_id, path):
        if item.is_dir:
            out += _artifact_files(client, run_id, item.path)
        elif item.path.endswith(TABLES):
            out.append(item.path)
    return out


def _drop_artifact_rows(tracking_uri: str, run_id: str, path: str, user_id: str) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path, dst_path=tmp,
                                                         tracking_uri=tracking_uri))
        dropped = _drop_rows(local, user_id)
        if dropped:  # written back under the same path: the store's copy is replaced
            parent = str(Path(path).parent)
            mlflow.MlflowClient(tracking_uri).log_artifact(run_id, str(local), None if parent == "." else parent)
        return dropped


def _redact_tags(client, run, user_id: str) -> int:
    """The run's tags that name the user: the prompt-run links to their (deleted) prompts are
    dropped from `mlflow.linkedPrompts`; in any other tag the id is replaced. (MLflow's params
    cannot change: none of ours holds a user id outside the user's own runs, deleted above.)"""
    names = {prompt_name(task.key, user_id) for task in TASKS.values()}
    changed = 0
    for key, value in run.data.tags.items():
        if key == "mlflow.linkedPrompts":
            try:
                links = json.loads(value)
            except ValueError:  # cut by MLflow's tag limit (a night of an earlier release): rewritten whole
                links = [{"name": n, "version": v} for n, v in re.findall(r'"name": "([^"]+)", "version": "(\d+)"', value)]
            kept = [link for link in links if link.get("name") not in names]
            if len(kept) != len(links):
                client.set_tag(run.info.run_id, key, json.dumps(kept))
                changed += 1
        elif not key.startswith("mlflow.") and _names_word(value, user_id):
            client.set_tag(run.info.run_id, key, re.sub(rf"(?<![\w-]){re.escape(user_id)}(?![\w-])",
                                                        "[a forgotten user]", value))
            changed += 1
    return changed


def _traces(experiment_id: str, user_id: str) -> list:
    quoted = user_id.replace("'", "\\'")
    found = mlflow.search_traces(locations=[experiment_id], filter_string=f"tags.user = '{quoted}'",
                                 return_type="list", include_spans=False)
    return [t.info for t in found]


def _tables(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and p.suffix in TABLES] if root.is_dir() else []


def _drop_rows(path: Path, user_id: str) -> int:
    """Drop the rows of one table file that name the user (a cell, a key or a row label equal to
    their id; in text, a line that holds it as a word); rewritten atomically. Returns the rows."""
    text = path.read_text(encoding="utf-8", errors="replace")
    if user_id not in text:
        return 0
    kept, dropped = _without(path.suffix, text, user_id)
    if dropped:
        atomic_write_text(path, kept)
    return dropped


def _without(suffix: str, text: str, user_id: str) -> tuple[str, int]:
    if suffix == ".csv":
        frame = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False)
        mine = frame.apply(lambda row: user_id in row.values, axis=1)
        return frame[~mine].to_csv(index=False), int(mine.sum())
    if suffix == ".json":
        kept, dropped = _filtered(json.loads(text), user_id)
        return json.dumps(kept), dropped
    lines = text.splitlines(keepends=True)  # .jsonl, .md, .txt: a line is a row
    kept = [line for line in lines if not _names_word(line, user_id)]
    return "".join(kept), len(lines) - len(kept)


def _filtered(data, user_id: str) -> tuple[object, int]:
    """`data` without the rows that name the user, at any depth: a record with a field equal to
    their id (`{"user_id": ...}`, a LaMP `golds` row), a table row holding it (MLflow's
    `{"columns", "data"}`), or an entry keyed by it; and how many rows that was."""
    if isinstance(data, list):
        kept, dropped = [], 0
        for item in data:
            if _names(item, user_id):
                dropped += 1
            else:
                item, inner = _filtered(item, user_id)
                kept.append(item)
                dropped += inner
        return kept, dropped
    if isinstance(data, dict):
        kept, dropped = {}, 0
        for key, value in data.items():
            if key == user_id:
                dropped += 1
            else:
                kept[key], inner = _filtered(value, user_id)
                dropped += inner
        return kept, dropped
    return data, 0


def _names(row, user_id: str) -> bool:
    if isinstance(row, dict):
        return any(v == user_id for v in row.values())
    if isinstance(row, list):
        return any(str(v) == user_id for v in row if not isinstance(v, (dict, list)))
    return row == user_id


def _names_word(line: str, user_id: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(user_id)}(?![\w-])", line) is not None


def _record(store: Path, user_id: str, removed: Counter) -> None:
    """One line per erasure: a hash salted per store (ids like `u0001` are guessable), the time
    and the counts. The salt stays in the store: `erased(store, id)` recomputes the hash."""
    line = json.dumps({"user": erasure_id(store, user_id), "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                       "removed": dict(+removed)})
    path = store / "forgotten.jsonl"
    atomic_write_text(path, (path.read_text(encoding="utf-8") if path.exists() else "") + line + "\n")


def erasure_id(store: Path, user_id: str) -> str:
    salt_file = store / "forget.salt"
    if not salt_file.exists():
        atomic_write_text(salt_file, secrets.token_hex(16))
    return hashlib.sha256((salt_file.read_text().strip() + user_id).encode()).hexdigest()[:32]
