"""Kill `ingest && nightly` at random points, again and again, and check the store after each
kill: memory opens and holds no duplicates, every production persona is a complete registered
version, no (fingerprint, iteration) is registered twice, state files parse. A final rerun
completes everything with nothing lost."""

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import replace

import mlflow
import pytest

from persona_agent.adapters.registry import PersonaRegistry
from persona_agent.adapters.state import StateStore
from persona_agent.data.synthetic import write_dataset
from persona_agent.data.tasks import LAMP_2M
from persona_agent.nightly.jobs import fingerprint
from persona_agent.runtime.store import Store
from persona_agent.settings import Settings

KILLS = 8
USERS = 6


def _cli(*args) -> list[str]:
    return [sys.executable, "-m", "persona_agent.cli", *args]


def _events(path, k: int):
    rows = [{"user_id": f"u{(k + d) % USERS:04d}", "input": LAMP_2M.make_input(f"A new heist film {k}-{d}.", LAMP_2M.labels),
             "response": "action", "timestamp": f"2026-01-{k + 1:02d}"} for d in range(2)]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


@contextlib.contextmanager
def _memory(settings: Settings):
    """The store's memory, opened as every command opens it: a killed process can hold the shard
    for a moment while it exits (or a child of it for longer), so wait for it as a command would,
    rather than racing the kernel's teardown."""
    with Store.open(replace(settings, store_wait=120.0), memory="persistent", tracking=False) as store:
        yield store.memory


def _check_store(settings: Settings) -> dict:
    """The invariants that must hold after any kill. Returns memory sizes per user."""
    with _memory(settings) as memory:
        sizes, fingerprints = {}, {}
        for user in memory.user_ids():
            ids = [it.item_id for it in memory.items(user)]
            assert len(ids) == len(set(ids)) == memory.count(user), f"duplicate memories for {user}"
            sizes[user], fingerprints[user] = len(ids), fingerprint(memory.items(user))
    mlflow.set_tracking_uri(settings.tracking_uri)
    registry, states = PersonaRegistry(LAMP_2M), StateStore.of(settings, LAMP_2M.key)
    for user in sizes:
        versions = registry.versions(user)
        tags = Counter((v.tags.get("fingerprint"), v.tags.get("iteration")) for v in versions)
        assert not tags or max(tags.values()) == 1, f"duplicate versions for {user}: {tags}"
        production = registry.production_version(user)  # parses the template: a complete persona
        state = states.get(user)
        if state is not None and state.fingerprint == fingerprints[user]:  # done: state is the truth
            assert production == state.version, f"{user}: state and production disagree"
        # (a user whose commit was interrupted may already serve their new version: still complete)
        if versions and production is None:  # killed between registering and promoting a new
            assert state is None, f"{user} was committed without a production persona"  # user's first one
    return sizes


@pytest.mark.slow
def test_random_kills_never_corrupt_the_store_and_a_rerun_finishes(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    kill_again_and_again(tmp_path)


def kill_again_and_again(tmp_path, *nightly_args: str, min_killed: int = KILLS // 2) -> None:
    """The kills, their checks and the rerun, on the tracking store MLFLOW_TRACKING_URI names (the
    store's own SQLite by default); `nightly_args`: more options for every night; at least
    `min_killed` runs must be killed before they end, or the test proves nothing."""
    settings = Settings(store=tmp_path / "mlruns")
    store = ["--store", str(settings.store)]
    nightly = _cli("nightly", *store, "--lm", "scripted:0.01", "--workers", "2", "-n", "2", "-T", "2", *nightly_args)
    env = {**os.environ, "DSPY_CACHEDIR": str(tmp_path / "cache")}
    data = write_dataset(tmp_path / "data", LAMP_2M, n_users=USERS, n_history=8, n_queries=1, seed=9)
    started = time.perf_counter()
    subprocess.run(_cli("ingest", str(data), *store), env=env, check=True, capture_output=True)
    unit = time.perf_counter() - started  # one CLI start and ingest: kill times scale with the machine
    rng, killed, events, landed = random.Random(7), 0, [], []
    for k in range(KILLS):
        events.append(_events(tmp_path / f"events-{k}.jsonl", k))
        script = f"{' '.join(_cli('ingest', str(events[-1]), *store))} && {' '.join(nightly)}"
        proc = subprocess.Popen(["sh", "-c", script], env=env, start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.25, 5.0) * unit)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the whole group: shell, CLI and its committer process
            killed += 1
        proc.wait()
        sizes = _check_store(settings)
        landed.append((sum(sizes.values()), len(StateStore.of(settings, LAMP_2M.key).user_ids()) if settings.state_db.exists() else 0))
    print(f"{killed} kills; memories and users done after each:", landed)
    assert killed >= min_killed, f"only {killed} of {KILLS} runs were killed mid-way"
    for path in events:  # the rerun: whatever the kills interrupted gets finished
        subprocess.run(_cli("ingest", str(path), *store), env=env, check=True, capture_output=True)
    assert subprocess.run(nightly, env=env, capture_output=True).returncode == 0
    sizes = _check_store(settings)
    assert sum(sizes.values()) == USERS * 8 + 2 * KILLS  # every memory once: nothing lost, nothing doubled
    states = StateStore.of(settings, LAMP_2M.key)
    with _memory(settings) as memory:
        for user in sizes:  # every user aligned on their whole, final history
            assert states.get(user).fingerprint == fingerprint(memory.items(user))
