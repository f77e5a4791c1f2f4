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
counts, never the user's id or text. Running it again finds nothing, changes nothing and says so.

Everything is found by identity: a row is the user's when its user column (`user_id`, the demo's
`user`) is their id, a run when its `user_id` tag or parameter is, a trace when its `user` tag
is. A value equal to their id anywhere else (a label, a count, a method's or task's name, another
run's tag) belongs to someone else and is never touched.

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
import shlex
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

from persona_agent.adapters import lm_cache
from persona_agent.adapters.points import ClientPoints, EdgePoints
from persona_agent.adapters.registry import PersonaRegistry, prompt_name
from persona_agent.adapters.state import StateStore
from persona_agent.data.atomic import atomic_write_text
from persona_agent.data.loaders import shown
from persona_agent.data.tasks import TASKS
from persona_agent.overrides import purge_run
from persona_agent.runtime.erasures import Journal
from persona_agent.runtime.progress import progress_bar
from persona_agent.runtime.store import disk_full, exclusive, refuse_pre_release
from persona_agent.settings import Settings, sqlite_file

log = logging.getLogger(__name__)
TABLES = (".json", ".csv", ".jsonl")  # the artifact and output files whose rows can be a user's
OUTPUTS = ("eval", "reports", "sweeps")  # folders of the store where commands write their tables


def forget(settings: Settings, user_id: str) -> Counter:
    """Remove everything of `user_id`; returns what was removed, by kind (empty: nothing of theirs
    was stored, and nothing was changed). Every part is found by identity (their id in a user
    column, key or tag), never by a value that happens to equal it.

    An erase is a journal (`<store>/forgetting.json`): the intent is written first (a salted
    hash, never the id), then each step is marked as it finishes. One that stops half way (an
    error, a kill) raises `EraseUnfinished` saying what was and was not removed; the next
    `forget` of the same id runs every step again (each finds only what is left) and finishes
    it, with the counts of both runs in the record. Meanwhile `answer` and `nightly` refuse the
    user and `doctor` names the unfinished erase (`being_forgotten`)."""
    if not isinstance(user_id, str) or not user_id.strip():
        raise ValueError(f"forget needs a user id; {user_id!r} names no user")
    refuse_pre_release(settings)  # its files hold the user too: an erase here would leave them
    with exclusive(settings):  # no nightly commits them again meanwhile, no ingest adds to them
        journal = Journal(settings.store)
        entry = journal.begin(user_id)
        removed = Counter(entry["removed"])
        steps = [("memories", lambda: _forget_memory(settings, user_id)),
                 ("nightly states", lambda: _forget_states(settings, user_id)),
                 ("persona versions", lambda: sum(PersonaRegistry(task, settings.tracking_uri).delete(user_id)
                                                  for task in TASKS.values())),
                 ("runs, artifact rows and traces", lambda: _forget_runs(settings, user_id)),
                 ("output rows", lambda: sum(_drop_rows(p, user_id) for d in OUTPUTS
                                             for p in _tables(settings.store / d))),
                 ("cached LM answers", lambda: lm_cache.evict(user_id))]
        with progress_bar(every=settings.progress_every) as progress:  # a store of many runs takes minutes
            bar = progress.add_task("forget", total=len(steps))
            for i, (step, run) in enumerate(steps):
                progress.update(bar, description=f"forget: {step}")
                try:
                    got = run()
                except BaseException as err:
                    journal.stopped(entry, removed, err)
                    raise EraseUnfinished(user_id, +removed, [name for name, _ in steps[i:]], err) from err
                removed += got if isinstance(got, Counter) else Counter({step: got})
                journal.mark(entry, step, removed)
                progress.update(bar, advance=1)
        removed = +removed
        if removed:
            if (database := sqlite_file(settings.tracking_uri)) is not None and database.exists():
                with contextlib.closing(sqlite3.connect(database, timeout=60)) as db:  # deleted rows leave no bytes
                    db.execute("VACUUM")
            _record(settings.store, user_id, removed)
        journal.end(user_id)  # nothing of theirs: the journal goes too, and no byte has changed
    return removed


class EraseUnfinished(RuntimeError):
    """An erase that stopped half way: what was removed, what was not, and why."""

    def __init__(self, user_id: str, removed: Counter, remaining: list[str], cause: BaseException):
        self.user_id, self.removed, self.remaining, self.cause = user_id, removed, remaining, cause
        self.disk_full = disk_full(cause)
        why = " ".join(str(cause).split("\n[SQL:")[0].split())[:200] or type(cause).__name__
        done = ", ".join(f"{n} {kind}" for kind, n in removed.items()) or "nothing yet"
        super().__init__(f"forgot {shown(user_id)} only in part: removed {done}; not removed yet: "
                         f"{', '.join(remaining)} ({why}). `answer` and `nightly` refuse them until "
                         f"`persona-agent forget {shlex.quote(user_id)}` runs again and finishes it")


def _forget_states(settings: Settings, user_id: str) -> int:
    states = StateStore(settings.state_db, "")
    n = states.delete(user_id)
    if n:
        states.compact()
    return n


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
        if _users_run(run, user_id):
            client.delete_run(run.info.run_id)
            if local:  # a local store deletes for good; a server keeps it in its trash until `mlflow gc`
                purge_run(settings.tracking_uri, run.info.run_id)
            removed["runs"] += 1
            continue
        for path in _artifact_files(client, run.info.run_id):
            removed["artifact rows"] += _drop_artifact_rows(settings.tracking_uri, run.info.run_id, path,
                                                            user_id=user_id)
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


def _users_run(run, user_id: str) -> bool:
    """A run of the user's own (the demo's per-user runs): its `user_id` tag or parameter is their
    id. Never by its name: a child run's name is also a method's (`rag`) or a task's."""
    return user_id in (run.data.tags.get("user_id"), run.data.params.get("user_id"))


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


def _drop_artifact_rows(tracking_uri: str, run_id: str, path: str, *, user_id: str) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path, dst_path=tmp,
                                                         tracking_uri=tracking_uri))
        dropped = _drop_rows(local, user_id)
        if dropped:  # written back under the same path: the store's copy is replaced
            parent = str(Path(path).parent)
            mlflow.MlflowClient(tracking_uri).log_artifact(run_id, str(local), None if parent == "." else parent)
        return dropped


def _redact_tags(client, run, user_id: str) -> int:
    """The run's tags that are the user's, known by what they are, never by a word they contain:
    the prompt-run links to their (deleted) prompts, dropped from `mlflow.linkedPrompts`; an eval
    stopped by their LM error (`stopped_user` is their id), whose message is replaced. (MLflow's
    params cannot change: none of ours holds a user id outside the user's own runs, deleted above.)"""
    names = {prompt_name(task.key, user_id) for task in TASKS.values()}
    tags, changed = run.data.tags, 0
    if value := tags.get("mlflow.linkedPrompts"):
        try:
            links = json.loads(value)
        except ValueError:  # cut by MLflow's tag limit (a night of an earlier release): rewritten whole
            links = [{"name": n, "version": v} for n, v in re.findall(r'"name": "([^"]+)", "version": "(\d+)"', value)]
        kept = [link for link in links if link.get("name") not in names]
        if len(kept) != len(links):
            client.set_tag(run.info.run_id, "mlflow.linkedPrompts", json.dumps(kept))
            changed += 1
    if tags.get(STOPPED_USER) == user_id:
        client.set_tag(run.info.run_id, "stopped", "the LLM failed (on a user since forgotten)")
        client.delete_tag(run.info.run_id, STOPPED_USER)
        changed += 1
    return changed


STOPPED_USER = "stopped_user"  # eval: whose LM error stopped the run (its `stopped` tag quotes it)


def _traces(experiment_id: str, user_id: str) -> list:
    """The traces whose `user` tag is the user's id. MLflow's filter grammar has no escape inside a
    quoted value: an id is quoted with a quote it does not hold, and one that holds both kinds is
    matched by reading every trace's tags. Either way, only an exact match is theirs."""
    quote = next((q for q in "'\"" if q not in user_id), None)
    condition = f"tags.user = {quote}{user_id}{quote}" if quote else None
    found = mlflow.search_traces(locations=[experiment_id], filter_string=condition, return_type="list",
                                 include_spans=False)
    return [t.info for t in found if t.info.tags.get("user") == user_id]


def _tables(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and p.suffix in TABLES] if root.is_dir() else []


def _drop_rows(path: Path, user_id: str) -> int:
    """Drop the rows of one table file that are the user's: a row whose user column (`user_id`, or
    `user` in the demo's table) is their id, nothing else; rewritten atomically only if one was.
    Returns the rows dropped. A value equal to the id in any other column (a label, a count, a
    method's name) is someone else's data and stays."""
    text = path.read_text(encoding="utf-8", errors="replace")
    try:
        kept, dropped = _without(path.suffix, text, user_id)
    except ValueError:  # not a table of ours (a user's own file in an output folder): left as it is
        log.warning("forget: %s is not a table it can read; left unchanged", path)
        return 0
    if dropped:
        atomic_write_text(path, kept)
    return dropped


def _without(suffix: str, text: str, user_id: str) -> tuple[str, int]:
    if suffix == ".csv":
        if not text.strip():
            return text, 0
        frame = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False)
        columns = [c for c in USER_COLUMNS if c in frame.columns]
        if not columns:
            return text, 0
        mine = (frame[columns] == user_id).any(axis=1)
        return (frame[~mine].to_csv(index=False), int(mine.sum())) if mine.any() else (text, 0)
    if suffix == ".json":
        kept, dropped = _filtered(json.loads(text), user_id)
        return (json.dumps(kept), dropped) if dropped else (text, 0)
    lines = text.splitlines(keepends=True)  # .jsonl: a line is a record
    kept = [line for line in lines if not _is_users_record(_json_or_none(line), user_id)]
    return "".join(kept), len(lines) - len(kept)


USER_COLUMNS = ("user_id", "user")  # the column or key that says whose a row is, in every table written here


def _filtered(data, user_id: str) -> tuple[object, int]:
    """`data` without the user's rows, at any depth: a record whose user key is their id
    (`{"user_id": ...}`, a LaMP `golds` row), a row of an MLflow table (`{"columns", "data"}`)
    whose user column is; and how many rows that was."""
    if isinstance(data, dict) and isinstance(data.get("columns"), list) and isinstance(data.get("data"), list):
        at = [i for i, c in enumerate(data["columns"]) if c in USER_COLUMNS]
        rows = [r for r in data["data"] if not (isinstance(r, list) and any(i < len(r) and _is_id(r[i], user_id)
                                                                            for i in at))]
        return {**data, "data": rows}, len(data["data"]) - len(rows)
    if isinstance(data, list):
        kept, dropped = [], 0
        for item in data:
            if _is_users_record(item, user_id):
                dropped += 1
                continue
            item, inner = _filtered(item, user_id)
            kept.append(item)
            dropped += inner
        return kept, dropped
    if isinstance(data, dict):
        kept, dropped = {}, 0
        for key, value in data.items():
            kept[key], inner = _filtered(value, user_id)
            dropped += inner
        return kept, dropped
    return data, 0


def _is_users_record(row, user_id: str) -> bool:
    return isinstance(row, dict) and any(_is_id(row.get(c), user_id) for c in USER_COLUMNS)


def _is_id(value, user_id: str) -> bool:
    return isinstance(value, str) and value == user_id


def _json_or_none(line: str):
    try:
        return json.loads(line)
    except ValueError:
        return None


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
