"""The served model (one pyfunc for every user) and a shared MLflow tracking server."""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import dspy
import mlflow
import pandas as pd
import pytest

from persona_agent.adapters.fakes import FakeEngine, default_policy
from persona_agent.adapters.points import open_memory
from persona_agent.adapters.registry import PersonaRegistry
from persona_agent.cli import main
from persona_agent.data.synthetic import write_dataset
from persona_agent.data.tasks import LAMP_2M
from persona_agent.pipelines.memory import MemoryItem
from persona_agent.pipelines.persona import Persona
from persona_agent.serving.model import log_model


def _follows_the_persona(fields, system, user):
    out = default_policy(fields, system, user)
    if "answer" in fields:
        out["answer"] = "action" if "Prefers action." in system else "comedy"
    return out


def test_the_served_model_answers_each_user_with_their_current_production_persona(mlflow_store):
    memory = open_memory(path=str(mlflow_store.qdrant_path))
    memory.add("u1", [MemoryItem("a", "A car chase film.", "action")])
    memory.add("u2", [MemoryItem("b", "A wedding film.", "comedy")])
    memory.close()
    registry = PersonaRegistry(LAMP_2M)
    registry.register("u1", Persona(LAMP_2M, "Prefers action."), "v1", production=True)
    registry.register("u2", Persona(LAMP_2M, "Likes comedy."), "v1", production=True)
    uri = log_model(mlflow_store, "lamp2m")
    params = mlflow.search_runs(search_all_experiments=True, filter_string="tags.command = 'log-model'").iloc[0]
    names = {c[7:]: v for c, v in params.items() if c.startswith("params.")}
    assert names["lm"] == mlflow_store.lm.model
    assert "lm/model" not in names  # the names every run uses
    assert "None" not in names.values()
    assert names["api_base"] == ""

    model = mlflow.pyfunc.load_model(uri)
    model.unwrap_python_model().lm = dspy.LM("fake/persona", engine=FakeEngine(_follows_the_persona), cache=False)
    query = LAMP_2M.make_input("A film about a heist.", LAMP_2M.labels)
    frame = pd.DataFrame({"user_id": ["u1", "u2", "nobody"], "query": [query] * 3})
    assert list(model.predict(frame)) == ["action", "comedy", None]
    blank = pd.DataFrame({"user_id": ["u1", "u1", "u1"], "query": ["", "   ", None]})
    assert list(model.predict(blank)) == [None, None, None]  # no question is answered with a label
    # tonight's alignment promotes a new version for u2: served at once, nothing logged again
    registry.register("u2", Persona(LAMP_2M, "Prefers action."), "aligned", production=True)
    assert list(model.predict(frame)) == ["action", "action", None]
    with pytest.raises(mlflow.exceptions.MlflowException, match="missing inputs"):
        model.predict(pd.DataFrame({"user": ["u1"]}))


def _wait_for(port: int, proc: subprocess.Popen, what: str, seconds: float) -> None:
    """Until something listens on `port`; fails if `proc` exits or `seconds` pass first."""
    deadline = time.time() + seconds
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            assert proc.poll() is None, f"{what} exited: {proc.stderr.read() if proc.stderr else ''}"
            assert time.time() < deadline, f"{what} did not start in {seconds:g} s"
            time.sleep(0.5)


@pytest.fixture(scope="module")
def tracking_server(tmp_path_factory):
    """`mlflow server` on a free local port: a sqlite backend, artifacts proxied to a folder."""
    root = tmp_path_factory.mktemp("server")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "MLFLOW_DISABLE_TELEMETRY": "true"}
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                             "--backend-store-uri", f"sqlite:///{root / 'server.db'}", "--artifacts-destination",
                             str(root / "artifacts"), "--workers", "1"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    _wait_for(port, proc, "mlflow server", 120)
    yield url, root
    proc.terminate()
    proc.wait(timeout=30)


@pytest.mark.slow
def test_every_command_and_the_served_model_work_against_a_tracking_server(tracking_server, tmp_path, monkeypatch,
                                                                           capsys):
    url, server_root = tracking_server
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    store = tmp_path / "store"
    data = write_dataset(tmp_path / "data", LAMP_2M, n_users=2, n_history=6, n_queries=1, seed=4)
    opts = ["--store", str(store), "--lm", "scripted", "--no-cache"]  # this test is about the tracking server
    query = LAMP_2M.make_input("A film about a heist.", LAMP_2M.labels)
    assert main(["ingest", str(data), "--store", str(store)]) == 0
    assert main(["nightly", *opts, "-n", "1", "-T", "1"]) == 0
    assert main(["personas", "list", "--store", str(store)]) == 0
    capsys.readouterr()
    assert main(["answer", "u0001", query, *opts]) == 0
    assert capsys.readouterr().out.strip() in LAMP_2M.labels
    assert main(["log-model", *opts]) == 0
    uri = re.search(r"^logged (\S+)", capsys.readouterr().out, flags=re.M).group(1)
    answers = mlflow.pyfunc.load_model(uri).predict(pd.DataFrame({"user_id": ["u0000", "u0001"], "query": [query] * 2}))
    assert all(a in LAMP_2M.labels for a in answers)
    # the registry and the runs live on the server, artifacts where the server keeps them
    client = mlflow.MlflowClient(url)
    assert len(PersonaRegistry(LAMP_2M, url).users()) == 2
    run = client.search_runs([client.get_experiment_by_name("persona-agent").experiment_id],
                             filter_string="tags.nightly_task = 'lamp2m'")[0]
    assert "users.csv" in {f.path for f in client.list_artifacts(run.info.run_id)}
    assert list(Path(server_root / "artifacts").rglob("users.csv"))
    assert not (store / "artifacts").exists()
    # forgetting a user reaches the server: their prompt, their rows in the night's artifacts
    capsys.readouterr()
    assert main(["forget", "u0001", "--store", str(store)]) == 0
    assert "forgot u0001: " in capsys.readouterr().out
    assert list(PersonaRegistry(LAMP_2M, url).users()["user_id"]) == ["u0000"]
    users_csv = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="users.csv",
                                                    dst_path=str(tmp_path / "down"))
    assert "u0000" in Path(users_csv).read_text()
    assert "u0001" not in Path(users_csv).read_text()
    assert not [p for p in Path(server_root / "artifacts").rglob("*") if p.is_file() and b"u0001" in p.read_bytes()]
    answers = mlflow.pyfunc.load_model(uri).predict(pd.DataFrame({"user_id": ["u0000", "u0001"], "query": [query] * 2}))
    assert answers[0] in LAMP_2M.labels
    assert answers[1] is None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("curl") is None, reason="the printed request uses curl, which is not installed")
def test_the_serve_command_log_model_prints_works_as_printed_from_any_directory(tmp_path, capsys):
    store = tmp_path / "store"
    data = write_dataset(tmp_path / "data", LAMP_2M, n_users=2, n_history=6, n_queries=1, seed=4)
    assert main(["ingest", str(data), "--store", str(store)]) == 0
    assert main(["nightly", "--store", str(store), "--lm", "scripted", "-n", "1", "-T", "1"]) == 0
    capsys.readouterr()
    assert main(["log-model", "--store", str(store), "--lm", "scripted"]) == 0
    printed = capsys.readouterr().out.splitlines()
    serve = next(line.strip() for line in printed if "mlflow models serve" in line)
    ask = next(line.strip() for line in printed if line.strip().startswith("curl "))
    port = _free_port()  # the one change: 5001 may be taken on this machine
    serve, ask = serve.replace("--port 5001", f"--port {port}"), ask.replace(":5001/", f":{port}/")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}  # a fresh shell: nothing set
    server = subprocess.Popen(serve, shell=True, cwd=elsewhere, env=env, start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(port, server, "the model server", 180)
        reply = subprocess.run(ask, shell=True, cwd=elsewhere, env=env, capture_output=True, text=True, timeout=120)
        assert json.loads(reply.stdout)["predictions"][0] in LAMP_2M.labels, reply
        unknown = ask.replace('"u0000"', '"nobody"')
        assert json.loads(subprocess.run(unknown, shell=True, env=env, capture_output=True, text=True,
                                         timeout=120).stdout) == {"predictions": [None]}
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)
    assert list(elsewhere.iterdir()) == []  # no stray mlflow.db where it was run
    assert "no production persona" in server.stderr.read()


def test_a_model_logged_with_the_earlier_nested_config_still_loads(tmp_path):
    from types import SimpleNamespace

    from persona_agent.serving.model import PersonaModel

    old = {"task": "lamp2m", "store": str(tmp_path), "qdrant_url": None, "top_k": 3, "max_iters": 1,
           "answer_step": "prompt", "prior_strength": 2.0, "store_wait": 5.0,
           "lm": {"model": "scripted", "api_base": None, "max_tokens": 100, "temperature": 0.0, "cache": False,
                  "retries": 1, "timeout": 9.0}}
    model = PersonaModel()
    model.load_context(SimpleNamespace(model_config=old))
    assert model.settings.lm.model == "scripted"
    assert model.settings.lm.max_tokens == 100
    assert model.settings.top_k == 3
    assert model.settings.qdrant_url is None
    assert model.settings.lm.api_base is None


def test_a_store_path_with_url_characters_is_served_from_a_fresh_cache(tmp_path, monkeypatch):
    """`%`, `?` and `#` in the store's path: the served process (another user's cache, say) makes
    the link to the store's database itself, instead of answering None from an empty database it
    created; a folder such a database left in the cache is replaced by the link."""
    from types import SimpleNamespace

    from persona_agent.adapters import tracking
    from persona_agent.serving.model import PersonaModel, model_config
    from persona_agent.settings import LMConfig, Settings

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache-of-the-command"))
    settings = Settings(store=tmp_path / "odd 50% ?#store", lm=LMConfig("scripted", cache=False))
    tracking.setup(settings)
    memory = open_memory(path=str(settings.qdrant_path))
    memory.add("u1", [MemoryItem("a", "A car chase film.", "action")])
    memory.close()
    PersonaRegistry(LAMP_2M, settings.tracking_uri).register("u1", Persona(LAMP_2M, "Prefers action."), "v1",
                                                               production=True)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache-of-the-server"))
    stale = settings.store_alias / "mlflow.db"  # what the earlier release's served model left
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"")
    model = PersonaModel()
    model.load_context(SimpleNamespace(model_config=model_config(settings, "lamp2m")))
    model.lm = dspy.LM("fake/persona", engine=FakeEngine(_follows_the_persona), cache=False)
    query = LAMP_2M.make_input("A film about a heist.", LAMP_2M.labels)
    assert model.predict(None, pd.DataFrame({"user_id": ["u1"], "query": [query]})) == ["action"]
    assert settings.store_alias.is_symlink()
    assert settings.store_alias.resolve() == settings.store.resolve()
