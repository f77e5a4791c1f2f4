"""Kill `ingest && nightly` at random points, again and again, and check the store after each
kill: memory opens and holds no duplicates, every production persona is a complete registered
version, no (fingerprint, iteration) is registered twice, state files parse. A final rerun
completes everything with nothing lost."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter

import mlflow

from persona_agent.config import Settings
from persona_agent.eval.synthetic import write_dataset
from persona_agent.eval.tasks import LAMP_2M
from persona_agent.pipelines.memory import EpisodicMemory
from persona_agent.pipelines.nightly import StateStore, fingerprint, state_root
from persona_agent.registry import PersonaRegistry

KILLS = 8
USERS = 6


def _cli(*args) -> list[str]:
    return [sys.executable, "-m", "persona_agent.cli", *args]


def _events(path, k: int):
    rows = [{"user_id": f"u{(k + d) % USERS:04d}", "input": LAMP_2M.make_input(f"A new heist film {k}-{d}.", LAMP_2M.labels),
             "response": "action", "timestamp": f"2026-01-{k + 1:02d}"} for d in range(2)]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


def _check_store(settings: Settings) -> dict:
    """The invariants that must hold after any kill. Returns memory sizes per user."""
    memory = EpisodicMemory.open(path=str(settings.qdrant_path))
    try:
        sizes = {}
        for user in memory.user_ids():
            ids = [it.item_id for it in memory.items(user)]
            assert len(ids) == len(set(ids)) == memory.count(user), f"duplicate memories for {user}"
            sizes[user] = len(ids)
    finally:
        memory.close()
    mlflow.set_tracking_uri(settings.tracking_uri)
    registry, states = PersonaRegistry(LAMP_2M), StateStore(state_root(settings, LAMP_2M))
    for user in sizes:
        versions = registry.versions(user)
        tags = Counter((v.tags.get("fingerprint"), v.tags.get("iteration")) for v in versions)
        assert not tags or max(tags.values()) == 1, f"duplicate versions for {user}: {tags}"
        production = registry.production_version(user)  # parses the template: a complete persona
        state = states.get(user)
        if state is not None:
            assert production == state["version"], f"{user}: state and production disagree"
        if versions:
            assert production is not None, f"{user} has versions but no production persona"
    return sizes


def test_random_kills_never_corrupt_the_store_and_a_rerun_finishes(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    settings = Settings(store=tmp_path / "mlruns")
    store = ["--store", str(settings.store)]
    nightly = _cli("nightly", *store, "--lm", "scripted:0.01", "--workers", "2", "-n", "2", "-T", "2")
    env = {**os.environ, "DSPY_CACHEDIR": str(tmp_path / "cache")}
    data = write_dataset(tmp_path / "data", LAMP_2M, n_users=USERS, n_history=8, n_queries=1, seed=9)
    subprocess.run(_cli("ingest", str(data), *store), env=env, check=True, capture_output=True)
    rng, killed, events, landed = random.Random(7), 0, [], []
    for k in range(KILLS):
        events.append(_events(tmp_path / f"events-{k}.jsonl", k))
        script = f"{' '.join(_cli('ingest', str(events[-1]), *store))} && {' '.join(nightly)}"
        proc = subprocess.Popen(["sh", "-c", script], env=env, start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(1.0, 14.0))
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the whole group: shell, CLI and its committer process
            killed += 1
        proc.wait()
        sizes = _check_store(settings)
        landed.append((sum(sizes.values()), len(list(state_root(settings, LAMP_2M).glob("*.json")))))
    print(f"{killed} kills; memories and users done after each:", landed)
    assert killed >= KILLS // 2, "most runs should have been killed mid-way"
    for path in events:  # the rerun: whatever the kills interrupted gets finished
        subprocess.run(_cli("ingest", str(path), *store), env=env, check=True, capture_output=True)
    assert subprocess.run(nightly, env=env, capture_output=True).returncode == 0
    sizes = _check_store(settings)
    assert sum(sizes.values()) == USERS * 8 + 2 * KILLS  # every memory once: nothing lost, nothing doubled
    states = StateStore(state_root(settings, LAMP_2M))
    memory = EpisodicMemory.open(path=str(settings.qdrant_path))
    try:
        for user in sizes:  # every user aligned on their whole, final history
            assert states.get(user)["fingerprint"] == fingerprint(memory.items(user))
    finally:
        memory.close()
