"""`forget X` erases the user whose id is X, found by identity (a user column, a `user_id` tag or
parameter, a trace's `user` tag), and nothing that merely equals X: users here are named like
another user's label (`comedy`), a count (`20`), a night and a version number (`2`), a method
(`rag`) and the task (`lamp2m`). After each erase, every other row, run, tag and the next night
are exactly as before; an id no user has changes no byte; a blank id is refused."""

import hashlib
import io
import json
from pathlib import Path

import mlflow
import pandas as pd
import pytest

from persona_agent.adapters import tracking
from persona_agent.adapters.points import EdgePoints
from persona_agent.adapters.registry import PersonaRegistry
from persona_agent.adapters.state import StateStore
from persona_agent.cli import main
from persona_agent.data.synthetic import write_dataset
from persona_agent.data.tasks import LAMP_2M
from persona_agent.pipelines.memory import EpisodicMemory
from persona_agent.settings import Settings

# Each a user; each also a value the store holds elsewhere: a label, a count, a night, a method, the task.
VICTIMS = ["comedy", "20", "2", "rag", "lamp2m"]
BYSTANDER = "u0005"
USERS = [*VICTIMS, BYSTANDER]
USER_COLUMNS = ("user_id", "user")


def _dataset(root: Path) -> Path:
    """Six users of the generator, renamed to the colliding ids (query and item ids too)."""
    data = write_dataset(root, LAMP_2M, n_users=len(USERS), n_history=4, n_queries=1, seed=3)
    names = {f"u{i:04d}": name for i, name in enumerate(USERS)}
    text = {}
    for path in data.glob("*.json"):
        body = path.read_text()
        for old, new in names.items():  # ids appear as "u0000" and as "u0000-q00", "u0000-h001"
            body = body.replace(f'"{old}"', f'"{new}"').replace(f'"{old}-', f'"{new}-')
        text[path] = body
    for path, body in text.items():
        path.write_text(body)
    return data


def _events(path: Path, users: list[str], night: int) -> Path:
    rows = [{"user_id": u, "input": LAMP_2M.make_input(f"A film about a night-{night} heist by {i}.", LAMP_2M.labels),
             "response": LAMP_2M.labels[(i + night) % len(LAMP_2M.labels)], "timestamp": f"2025-02-0{night}T0{i}:00:00"}
            for i, u in enumerate(users)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _rows(path: str, data: bytes) -> list:
    """A table artifact as a list of rows (each row as JSON text), or None for a file that is no table."""
    if path.endswith(".csv"):
        frame = pd.read_csv(io.BytesIO(data), dtype=str, keep_default_na=False)
        return [json.dumps(r, sort_keys=True) for r in frame.to_dict("records")]
    body = json.loads(data)
    if isinstance(body, dict) and "columns" in body and "data" in body:
        return [json.dumps(dict(zip(body["columns"], r)), sort_keys=True) for r in body["data"]]
    if isinstance(body, dict) and "golds" in body:
        return [json.dumps(r, sort_keys=True) for r in body["golds"]]
    return [json.dumps(body, sort_keys=True)]


def _owner(row: str) -> str | None:
    record = json.loads(row)
    return next((record[c] for c in USER_COLUMNS if isinstance(record, dict) and c in record), None)


def _snapshot(settings: Settings) -> dict:
    """Everything a user could lose, keyed so that two snapshots compare: runs (name, tags, params),
    every table artifact and output's rows, memory counts, prompt versions, state rows, traces."""
    client = mlflow.MlflowClient(settings.tracking_uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs, tables = {}, {}
    for run in client.search_runs(experiments, max_results=1000):
        runs[run.info.run_id] = (run.info.run_name, dict(run.data.tags), dict(run.data.params))
        stack = [None]
        while stack:
            for item in client.list_artifacts(run.info.run_id, stack.pop()):
                if item.is_dir:
                    stack.append(item.path)
                elif item.path.endswith((".csv", ".json")):
                    local = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path=item.path,
                                                                tracking_uri=settings.tracking_uri)
                    tables[(run.info.run_id, item.path)] = _rows(item.path, Path(local).read_bytes())
    for folder in ("eval", "reports"):
        for path in (settings.store / folder).rglob("*"):
            if path.suffix in (".csv", ".json"):
                tables[("store", str(path.relative_to(settings.store)))] = _rows(path.name, path.read_bytes())
    memory = EpisodicMemory(EdgePoints(settings.qdrant_path))
    counts = {u: memory.count(u) for u in memory.user_ids()}
    memory.close()
    registry = PersonaRegistry(LAMP_2M, settings.tracking_uri)
    prompts = {u: len(registry.versions(u)) for u in USERS if registry.versions(u)}
    states = StateStore(settings.state_db, LAMP_2M.key).user_ids()
    traces = {}
    for experiment in experiments:
        for t in mlflow.search_traces(locations=[experiment], return_type="list", include_spans=False):
            traces[t.info.trace_id] = t.info.tags.get("user")
    return {"runs": runs, "tables": tables, "memory": counts, "prompts": prompts, "states": states, "traces": traces}


def _without(snapshot: dict, user: str) -> dict:
    """What `snapshot` must become after forgetting `user`: their rows, memory, prompts, state and
    traces gone, the links to their prompts dropped from run tags; nothing else."""
    names = {PersonaRegistry(LAMP_2M, "").name(user)}
    runs = {}
    for run_id, (name, tags, params) in snapshot["runs"].items():
        tags = dict(tags)
        if "mlflow.linkedPrompts" in tags:
            tags["mlflow.linkedPrompts"] = json.dumps([link for link in json.loads(tags["mlflow.linkedPrompts"])
                                                       if link["name"] not in names])
        runs[run_id] = (name, tags, params)
    return {"runs": runs,
            "tables": {k: [r for r in rows if _owner(r) != user] for k, rows in snapshot["tables"].items()},
            "memory": {u: n for u, n in snapshot["memory"].items() if u != user},
            "prompts": {u: n for u, n in snapshot["prompts"].items() if u != user},
            "states": snapshot["states"] - {user},
            "traces": {t: u for t, u in snapshot["traces"].items() if u != user}}


def _normal(snapshot: dict) -> dict:
    """Link lists compare as sets of (name, version); an empty list and a missing tag alike."""
    runs = {}
    for run_id, (name, tags, params) in snapshot["runs"].items():
        tags = dict(tags)
        links = json.loads(tags.pop("mlflow.linkedPrompts", "[]"))
        runs[run_id] = (name, tags, params, sorted((link["name"], str(link["version"])) for link in links))
    return {**snapshot, "runs": runs}


def _bytes(store: Path) -> dict[str, str]:
    return {str(p.relative_to(store)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(store.rglob("*")) if p.is_file() and not p.name.endswith(".lock")}


@pytest.fixture
def store(tmp_path, monkeypatch):
    """Two nights (so `night` is 2), an eval with `rag` and traces, and a report, on six users."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    store, data = tmp_path / "store", _dataset(tmp_path / "data")
    common = ["--store", str(store)]
    lm = ["--lm", "scripted", "-n", "2", "-T", "1", *common]
    try:
        assert main(["ingest", str(data), *common]) == 0
        assert main(["nightly", "--trace", *lm]) == 0
        assert main(["ingest", str(_events(tmp_path / "night2.jsonl", USERS, 2)), *common]) == 0
        assert main(["nightly", "--trace", *lm]) == 0
        assert main(["eval", "--data", str(data), "--methods", "non-personalized,rag,persona-agent", "--trace",
                     *lm]) == 0
        assert main(["report", *common]) == 0
    finally:
        tracking.disable_traces()
    return Settings(store=store), tmp_path


def test_forget_erases_by_identity_never_by_value(store, capsys):
    settings, tmp_path = store
    common = ["--store", str(settings.store)]
    before = _snapshot(settings)
    assert {t for t in before["tables"] if t[1] == "users.csv"}, "the night's users.csv is among the tables compared"
    assert set(before["memory"]) == set(USERS) and set(before["prompts"]) == set(USERS), before["prompts"]
    assert {"rag"} <= {name for name, _, _ in before["runs"].values()}  # the eval's child run named like a user
    assert {tags.get("night") for _, tags, _ in before["runs"].values()} >= {"1", "2"}
    assert sum(u == "comedy" for u in before["traces"].values()) > 0

    for blank in ("", "   "):
        assert main(["forget", blank, *common]) == 2
    bytes_before = _bytes(settings.store)
    for nobody in ("aligned", "persona-agent", "0", "u9999", "classic"):  # values the store holds; no user's id
        capsys.readouterr()
        assert main(["forget", nobody, *common]) == 0
        assert "nothing was changed" in capsys.readouterr().out
    assert _bytes(settings.store) == bytes_before  # not one byte: no rows, no VACUUM, no record

    expected = before
    for victim in VICTIMS:
        capsys.readouterr()
        assert main(["forget", victim, *common]) == 0
        assert "Downloading artifacts" not in capsys.readouterr().err  # it reads every table: no bar for each
        expected = _without(expected, victim)
        after = _snapshot(settings)
        assert _normal(after) == _normal(expected), victim
    assert set(after["memory"]) == {BYSTANDER}
    assert set(after["prompts"]) == {BYSTANDER}
    assert after["tables"] != {k: [] for k in after["tables"]}  # the bystander's rows stand

    # The next night: numbered 3, the bystander's new interaction aligned, nobody erased comes back.
    assert main(["ingest", str(_events(tmp_path / "night3.jsonl", [BYSTANDER], 3)), *common]) == 0
    assert main(["nightly", "--lm", "scripted", "-n", "2", "-T", "1", *common]) == 0
    client = mlflow.MlflowClient(settings.tracking_uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    nights = sorted(int(r.data.tags["night"]) for r in client.search_runs(experiments) if "night" in r.data.tags)
    assert nights == [1, 2, 3]
    last = _snapshot(settings)
    assert set(last["memory"]) == {BYSTANDER}
    assert set(last["prompts"]) == {BYSTANDER}
    assert main(["report", *common]) == 0


@pytest.mark.parametrize("user", ["o'brien", 'say "hi"', "both ' and \"", "back\\slash"])
def test_a_users_traces_are_found_whatever_quotes_their_id_holds(mlflow_store, user):
    from persona_agent.operations.forget import _traces

    experiment = mlflow.set_experiment("quoting").experiment_id
    ids = {}
    for who in (user, "someone else", user + "x"):
        with mlflow.start_span(name="work") as span:
            mlflow.update_current_trace(tags={"user": who})
        ids[who] = span.trace_id
    mlflow.flush_trace_async_logging()
    assert [t.trace_id for t in _traces(experiment, user)] == [ids[user]]


def test_an_eval_stopped_by_a_users_lm_error_loses_their_id_and_keeps_the_rest(mlflow_store):
    from persona_agent.operations.forget import _redact_tags

    client = mlflow.MlflowClient()
    experiment = mlflow.set_experiment("stops").experiment_id
    tags = {"stopped": "the LLM failed (user 2: RateLimitError: ...)", "stopped_user": "2", "night": "2", "partial": "true"}
    theirs, other = (client.create_run(experiment, tags={**tags, "stopped_user": who}).info.run_id for who in ("2", "3"))
    for run_id in (theirs, other):
        _redact_tags(client, client.get_run(run_id), "2")
    mine = client.get_run(theirs).data.tags
    assert "stopped_user" not in mine and "2" not in mine["stopped"], mine
    assert (mine["night"], mine["partial"]) == ("2", "true")  # a tag equal to the id that names no user stays
    assert {k: v for k, v in client.get_run(other).data.tags.items() if k in tags} == {**tags, "stopped_user": "3"}
