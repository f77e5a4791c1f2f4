import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import replace

import pytest
from filelock import FileLock

from persona_agent.adapters.points import open_memory
from persona_agent.adapters.registry import PersonaRegistry
from persona_agent.adapters.state import StateStore
from persona_agent.cli import main
from persona_agent.data.synthetic import write_dataset
from persona_agent.data.tasks import LAMP_2M, TaskDataError
from persona_agent.nightly.driver import NightlyLocked, run_nightly
from persona_agent.nightly.jobs import fingerprint
from persona_agent.pipelines.memory import MemoryItem
from persona_agent.settings import LMConfig, Settings

from ..helpers import ingest_into


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    data = write_dataset(tmp_path / "data", LAMP_2M, n_users=4, n_history=8, n_queries=1, seed=2)
    settings = Settings(store=tmp_path / "mlruns", lm=LMConfig("scripted", cache=False), batch_size=2, iterations=2, max_iters=1)
    return settings, data


def _event(tmp_path, user, n):
    path = tmp_path / f"events-{user}-{n}.jsonl"
    q = LAMP_2M.make_input(f"A film about a new heist {n}.", LAMP_2M.labels)
    path.write_text(json.dumps({"user_id": user, "input": q, "response": "action", "timestamp": f"2025-01-0{n}"}) + "\n")
    return path


def test_ingest_is_idempotent(store, tmp_path):
    settings, data = store
    first, again = ingest_into(settings, data), ingest_into(settings, data)
    assert (first.added, again.added, again.already_known) == (32, 0, 32)
    event = _event(tmp_path, "u0001", 1)
    assert ingest_into(settings, event).added == 1
    assert ingest_into(settings, event).added == 0


def test_bad_events_are_rejected_before_anything_is_written(store, tmp_path):
    settings, _ = store
    bad = tmp_path / "bad.jsonl"
    good = json.dumps({"user_id": "x", "input": "description: a", "response": "comedy"})
    bad.write_text(good + "\n" + json.dumps({"user_id": "x", "input": "description: b", "response": "western"}) + "\n")
    with pytest.raises(TaskDataError, match=r"bad.jsonl:2: gold 'western'"):
        ingest_into(settings, bad)
    memory = open_memory(path=str(settings.qdrant_path))
    assert memory.count() == 0
    memory.close()


def test_only_users_with_new_interactions_are_realigned(store, tmp_path):
    settings, data = store
    ingest_into(settings, data)
    first = run_nightly(settings, LAMP_2M)
    assert sorted(first.aligned + first.rejected) == ["u0000", "u0001", "u0002", "u0003"]
    assert first.lm_calls > 0
    second = run_nightly(settings, LAMP_2M)
    assert second.lm_calls == 0
    assert second.counts()["users_unchanged"] == 4
    assert second.unchanged == []  # no change was marked: no user's memory was even read
    ingest_into(settings, _event(tmp_path, "u0002", 1))
    third = run_nightly(settings, LAMP_2M)
    assert third.aligned + third.rejected == ["u0002"]
    assert third.counts()["users_unchanged"] == 3


def test_memory_written_outside_ingest_is_planned_with_all_users(store, tmp_path):
    """Planning reads only the users `ingest` marked: memory added by other means waits for
    `--all-users`, which reads every user's memory as before."""
    settings, data = store
    ingest_into(settings, data)
    run_nightly(settings, LAMP_2M)
    memory = open_memory(path=str(settings.qdrant_path))
    memory.add("u0003", [MemoryItem("outside-1", LAMP_2M.make_input("A quiet heist film.", LAMP_2M.labels), "action")])
    memory.close()
    assert run_nightly(settings, LAMP_2M).lm_calls == 0
    summary = run_nightly(replace(settings, plan_all=True), LAMP_2M)
    assert summary.aligned + summary.rejected == ["u0003"]
    assert sorted(summary.unchanged) == ["u0000", "u0001", "u0002"]


def test_a_second_concurrent_run_refuses_to_start(store, capsys):
    settings, data = store
    settings.store.mkdir(parents=True)
    with FileLock(str(settings.store / "nightly.lock")):
        with pytest.raises(NightlyLocked, match="another nightly run holds"):
            run_nightly(settings, LAMP_2M)
        assert main(["nightly", "--store", str(settings.store), "--lm", "scripted"]) == 3
    assert "refusing to start a second one" in capsys.readouterr().err


def _parent(pid: str) -> int | None:
    """The parent pid of a live process, None once it has exited."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] == "Z" else int(fields[1])


@pytest.mark.slow
def test_a_killed_run_then_a_rerun_aligns_every_user_exactly_once(store, tmp_path):
    settings, data = store
    write_dataset(data, LAMP_2M, n_users=8, n_history=8, n_queries=1, seed=3)
    ingest_into(settings, data)
    cmd = [sys.executable, "-m", "persona_agent.cli", "nightly", "--store", str(settings.store), "--lm", "scripted:0.01",
           "--workers", "2", "-n", "2", "-T", "2"]
    env = {**os.environ, "DSPY_CACHEDIR": str(tmp_path / "cache")}
    states = StateStore.of(settings, LAMP_2M.key)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (settings.state_db.exists() and states.count()) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    children = [pid for pid in os.listdir("/proc") if pid.isdigit() and _parent(pid) == proc.pid]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 10  # the committer process notices and exits too: no orphan
    while any(_parent(pid) is not None for pid in children) and time.time() < deadline:
        time.sleep(0.1)
    assert children
    assert all(_parent(pid) is None for pid in children)
    done_before = states.count()
    assert 0 < done_before < 8, "the kill should land mid-run"
    assert subprocess.run(cmd, env=env, capture_output=True).returncode == 0

    import mlflow

    mlflow.set_tracking_uri(settings.tracking_uri)
    registry, memory = PersonaRegistry(LAMP_2M), open_memory(path=str(settings.qdrant_path))
    try:
        for user in memory.user_ids():
            state = states.get(user)
            assert state.fingerprint == fingerprint(memory.items(user))
            tags = Counter((v.tags["fingerprint"], v.tags["iteration"]) for v in registry.versions(user))
            assert tags and max(tags.values()) == 1, f"duplicate versions for {user}: {tags}"
            assert registry.get(user).version == state.version  # production is complete and parses
    finally:
        memory.close()


@pytest.mark.slow
def test_ray_executor_gives_the_same_personas_as_threads(tmp_path, monkeypatch, request):
    ray = pytest.importorskip("ray")
    request.addfinalizer(ray.shutdown)  # the local instance the night starts: not left to later tests
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DSPY_CACHEDIR", str(tmp_path / "cache"))
    data = write_dataset(tmp_path / "data", LAMP_2M, n_users=3, n_history=8, n_queries=1, seed=4)
    personas = {}
    for executor in ("thread", "ray"):
        settings = Settings(store=tmp_path / executor, lm=LMConfig("scripted", cache=False), batch_size=2,
                            iterations=2, max_iters=1)
        ingest_into(settings, data)
        summary = run_nightly(replace(settings, workers=2), LAMP_2M, executor=executor)
        assert not summary.failed
        assert summary.lm_calls > 0
        import mlflow

        mlflow.set_tracking_uri(settings.tracking_uri)
        registry = PersonaRegistry(LAMP_2M)
        personas[executor] = {u: registry.get(u).persona.render() for u in ("u0000", "u0001", "u0002")}
    assert personas["thread"] == personas["ray"]
