"""Stopping `nightly` on purpose (Ctrl-C, SIGTERM) and losing its commit process by accident."""

import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace

import mlflow
import pytest

from persona_agent.adapters.llm import build_lm
from persona_agent.adapters.registry import PersonaRegistry
from persona_agent.adapters.state import StateStore
from persona_agent.data.synthetic import write_dataset
from persona_agent.data.tasks import LAMP_2M
from persona_agent.nightly.driver import run_nightly
from persona_agent.settings import LMConfig, Settings

from ..helpers import ingest_into

USERS = 6


def _done(settings) -> int:
    return len(StateStore.of(settings, LAMP_2M.key).user_ids()) if settings.state_db.exists() else 0


def _wait_for(condition, seconds=120.0):
    deadline = time.time() + seconds
    while not condition():
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


def _from_the_second_users_profile():
    profiles = 0

    def hold(prompt: str) -> bool:
        nonlocal profiles
        profiles += "Write this user's profile" in prompt  # each user's first call, on a first night
        return profiles >= 2
    return hold


def _read_lines(stream, lines: list, seen: threading.Event, marker: str) -> threading.Thread:
    def read():
        for line in stream:
            lines.append(line)
            if marker in line:
                seen.set()
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    return reader


def _a_night_held_at_the_second_user(tmp_path, monkeypatch, fake_llm_server):
    """(settings, server, env, command) of a `nightly` over USERS users, one at a time, against a
    fake LLM server that holds every request from the second user's first call (its profile) on:
    the first user has finished and no other can, however slow or loaded the machine is."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    settings = Settings(store=tmp_path / "mlruns")
    ingest_into(settings, write_dataset(tmp_path / "data", LAMP_2M, n_users=USERS, n_history=8, n_queries=1, seed=5))
    server, url = fake_llm_server.serve_in_background(latency=0.0)
    server.handler.hold = _from_the_second_users_profile()
    env = {**os.environ, "DSPY_CACHEDIR": str(tmp_path / "cache"), "OPENAI_API_KEY": "sk-fake"}
    command = [sys.executable, "-m", "persona_agent.cli", "nightly", "--store", str(settings.store), "--workers", "1",
               "--lm", "openai/gpt-4o-mini", "--api-base", url, "-n", "2", "-T", "2"]
    return settings, server, env, command


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_stops_new_work_at_once_commits_what_finished_and_a_rerun_finishes(
        sig, tmp_path, monkeypatch, fake_llm_server):
    settings, server, env, command = _a_night_held_at_the_second_user(tmp_path, monkeypatch, fake_llm_server)
    try:
        # its own process group, signalled as a terminal signals one (Ctrl-C reaches the commit process too)
        proc = subprocess.Popen(command, env=env, start_new_session=True, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        out_lines, err_lines, stopping = [], [], threading.Event()
        readers = [_read_lines(proc.stdout, out_lines, threading.Event(), "\0"),
                   _read_lines(proc.stderr, err_lines, stopping, "stopping")]
        _wait_for(lambda: (server.handler.held >= 1 and _done(settings) >= 1) or proc.poll() is not None)
        assert proc.poll() is None, "the run finished before it could be stopped"
        calls_at_signal = server.handler.calls
        os.killpg(proc.pid, sig)
        _wait_for(lambda: stopping.is_set() or proc.poll() is not None)  # the run has taken the signal
        server.handler.released.set()  # only now may the calls in flight finish
        proc.wait(timeout=60)
        for reader in readers:
            reader.join(timeout=10)
        out, err = "".join(out_lines), "".join(err_lines)
        calls_after = server.handler.calls - calls_at_signal
        committed = _done(settings)
        assert proc.returncode == 128 + sig, err[-2000:]
        assert f"stopped by {sig.name}" in out
        assert "Traceback" not in err
        assert calls_after <= 1  # at most the call already in flight (1 worker): nothing new started
        assert committed == 1  # the user that finished before the signal, and no other
        mlflow.set_tracking_uri(settings.tracking_uri)
        registry, states = PersonaRegistry(LAMP_2M), StateStore.of(settings, LAMP_2M.key)
        served = {u for u in registry.users()["user_id"] if registry.production_version(u) is not None}
        assert states.user_ids() <= served  # a user with a state row was committed: production is theirs
        assert all(states.get(u).version == registry.production_version(u) for u in states.user_ids())
        assert len(served) >= committed
        run = mlflow.search_runs(search_all_experiments=True, order_by=["start_time DESC"]).iloc[0]
        assert run["tags.stopped_by"] == sig.name
        assert run["status"] == "FINISHED"
        assert run["metrics.users_interrupted"] == USERS - run["metrics.users_aligned"] - run["metrics.users_rejected"]
        # the next run does the rest, and only the rest
        server.handler.hold = None
        rerun = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    finally:
        server.handler.released.set()
        server.shutdown()
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert _done(settings) == USERS
    assert f"unchanged {committed}" in rerun.stdout


@pytest.mark.slow
def test_a_second_ctrl_c_aborts_at_once_in_one_line_and_the_night_reads_killed(tmp_path, monkeypatch,
                                                                              fake_llm_server):
    settings, server, env, command = _a_night_held_at_the_second_user(tmp_path, monkeypatch, fake_llm_server)
    try:
        proc = subprocess.Popen(command, env=env, start_new_session=True, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        err_lines, stopping = [], threading.Event()
        reader = _read_lines(proc.stderr, err_lines, stopping, "stopping")
        _wait_for(lambda: (server.handler.held >= 1 and _done(settings) >= 1) or proc.poll() is not None)
        assert proc.poll() is None, "the run finished before it could be stopped"
        os.killpg(proc.pid, signal.SIGINT)
        _wait_for(lambda: stopping.is_set() or proc.poll() is not None)
        os.killpg(proc.pid, signal.SIGINT)  # again, with a call still held: no waiting for it
        proc.wait(timeout=60)
        reader.join(timeout=10)
    finally:
        server.handler.released.set()
        server.shutdown()
    err = "".join(err_lines)
    assert proc.returncode == 130 and "Traceback" not in err and "persona-agent: aborted" in err, err[-2000:]
    mlflow.set_tracking_uri(settings.tracking_uri)
    run = mlflow.search_runs(search_all_experiments=True, order_by=["start_time DESC"]).iloc[0]
    assert run["status"] == "KILLED"
    assert "twice" in run["tags.stopped_by"]
    assert _done(settings) == 1  # what was committed before stands


@pytest.mark.parametrize("restarts", [3, 0])
@pytest.mark.slow
def test_a_killed_commit_process_is_replaced_or_the_rest_fail_named(restarts, tmp_path, monkeypatch):
    from persona_agent.nightly import committer

    monkeypatch.setattr(committer.Committer, "RESTARTS", restarts)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    settings = Settings(store=tmp_path / "mlruns", lm=LMConfig("scripted:0.05", cache=False), batch_size=2,
                        iterations=2, workers=2)
    ingest_into(settings, write_dataset(tmp_path / "data", LAMP_2M, n_users=USERS, n_history=8, n_queries=1, seed=4))
    killed = []

    def kill_the_committer_after_its_first_commit():
        _wait_for(lambda: _done(settings) >= 1)
        for child in multiprocessing.active_children():
            os.kill(child.pid, signal.SIGKILL)
            killed.append(child.pid)

    killer = threading.Thread(target=kill_the_committer_after_its_first_commit, daemon=True)
    killer.start()
    summary = run_nightly(replace(settings), LAMP_2M, lm=build_lm(settings.lm))
    killer.join()
    assert killed
    if restarts:
        assert _done(settings) == USERS
        assert not summary.failed
        assert len(summary.aligned) + len(summary.rejected) == USERS
        mlflow.set_tracking_uri(settings.tracking_uri)
        registry = PersonaRegistry(LAMP_2M)
        assert all(registry.production_version(u) is not None for u in registry.users()["user_id"])
    else:  # no restart allowed: the users not yet committed fail, named, and are retried next run
        assert 1 <= _done(settings) < USERS
        assert len(summary.failed) == USERS - _done(settings)
        assert all("commit failed: BrokenProcessPool" in e for e in summary.failed.values())
