"""Several processes on one store: they take turns on the embedded memory, a bounded wait ends
in exit 5 with one line, and a served persona keeps answering while `nightly` runs."""

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from persona_agent.adapters.llm import build_lm
from persona_agent.cli import main
from persona_agent.data.synthetic import write_dataset
from persona_agent.data.tasks import LAMP_2M
from persona_agent.nightly.driver import run_nightly
from persona_agent.settings import LMConfig, Settings

from ..helpers import ingest_into

pytestmark = pytest.mark.slow  # other processes on one store: the second tier

HOLD = """
import sys, time
from pathlib import Path
from persona_agent.settings import Settings
{open}
print("held", flush=True)
time.sleep(float(sys.argv[2]))
"""
OURS = """from persona_agent.runtime.store import Store
held = Store.open(Settings(store=Path(sys.argv[1])), memory="persistent", tracking=False)
held.__enter__()"""
FOREIGN = """from qdrant_edge import EdgeShard
shard = EdgeShard.load(str(Path(sys.argv[1]) / "qdrant-edge"))"""


@pytest.fixture
def served(tmp_path, monkeypatch):
    """A store whose users have production personas, and an `answer` command line for one of them."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    settings = Settings(store=tmp_path / "mlruns", lm=LMConfig("scripted", cache=False), batch_size=2, iterations=1)
    ingest_into(settings, write_dataset(tmp_path / "data", LAMP_2M, n_users=4, n_history=6, n_queries=1, seed=2))
    run_nightly(replace(settings, workers=2), LAMP_2M, lm=build_lm(settings.lm))
    query = LAMP_2M.make_input("A film about a heist.", LAMP_2M.labels)
    return settings, ["answer", "u0001", query, "--lm", "scripted", "--store", str(settings.store)]


def _hold(store, seconds: float, how: str = OURS) -> subprocess.Popen:
    env = {**os.environ, "DSPY_CACHEDIR": str(Path(store).parent / "holder-cache")}  # a DSPy cache of its own
    proc = subprocess.Popen([sys.executable, "-c", HOLD.format(open=how), str(store), str(seconds)],
                            stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_process_waits_its_turn(served, capsys, caplog):
    settings, answer = served
    holder = _hold(settings.store, 3)
    try:
        assert main(answer) == 0
    finally:
        holder.wait()
    out, err = capsys.readouterr()
    assert out.strip() == "comedy"
    assert "Traceback" not in err
    assert "another process is using the memory" in caplog.text
    assert "waiting up to 60 s" in caplog.text


@pytest.mark.parametrize("how, says", [(OURS, "kept the memory"), (FOREIGN, "outside persona-agent")],
                         ids=["persona-agent", "foreign"])
def test_a_store_held_too_long_exits_5_with_one_line(how, says, served, capsys):
    settings, answer = served
    holder = _hold(settings.store, 20, how)
    try:
        capsys.readouterr()
        assert main([*answer, "--wait", "0.5"]) == 5
        assert main(["nightly", "--store", str(settings.store), "--lm", "scripted", "--wait", "0.5"]) == 5
    finally:
        holder.kill()
        holder.wait()
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("persona-agent:")]
    assert len(lines) == 2
    assert all(says in line for line in lines)
    assert "Traceback" not in err


def test_answers_are_served_while_nightly_runs_on_the_same_store(served, tmp_path, capsys):
    settings, answer = served
    events = tmp_path / "new.jsonl"
    events.write_text("\n".join(json.dumps({"user_id": f"u{u:04d}", "response": "action",
                                            "input": LAMP_2M.make_input(f"Heist {u}.", LAMP_2M.labels)})
                                for u in range(4)))
    ingest_into(settings, events)  # every user changed: nightly has work
    env = {**os.environ, "DSPY_CACHEDIR": str(tmp_path / "cache")}
    nightly = subprocess.Popen([sys.executable, "-m", "persona_agent.cli", "nightly", "--store", str(settings.store),
                                "--lm", "scripted:0.1", "--workers", "2", "-n", "2", "-T", "2"],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    answered = []
    while nightly.poll() is None:
        answered.append(main(answer))
    out, err = nightly.communicate()
    assert nightly.returncode == 0, err[-2000:]
    assert "aligned 4" in out or "rejected" in out
    assert len(answered) >= 2
    assert set(answered) == {0}
