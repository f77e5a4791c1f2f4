"""Test, then align: each night the production persona is scored on the interactions that
arrived since it was aligned, before they reach its memory or an alignment batch."""

import json
import re
from dataclasses import replace

import dspy
import mlflow

from persona_agent.adapters.fakes import FakeEngine
from persona_agent.adapters.llm import build_lm
from persona_agent.adapters.state import StateStore
from persona_agent.cli import main
from persona_agent.data.synthetic import write_dataset
from persona_agent.data.tasks import LAMP_2M
from persona_agent.nightly.driver import run_nightly
from persona_agent.nightly.jobs import UserJob, fingerprint, prequential
from persona_agent.pipelines.memory import MemoryItem
from persona_agent.settings import LMConfig, Settings

from ..helpers import ingest_into, write_events


def test_the_production_persona_is_scored_only_on_items_it_has_never_seen():
    seen = [MemoryItem(f"s{i}", f"A seen heist film {i}.", "action", f"2026-01-{i + 1:02d}") for i in range(6)]
    new = [MemoryItem(f"n{i}", f"NEWFILM-{i}, a heist.", "comedy", f"2026-02-{i + 1:02d}") for i in range(3)]
    job = UserJob("u1", seen + new, fingerprint(seen + new), "Likes heists.", frozenset(it.item_id for it in seen))
    engine = FakeEngine()
    lm = dspy.LM("fake/policy", engine=engine, cache=False, num_retries=0)
    with dspy.context(lm=lm, adapter=dspy.JSONAdapter()):
        scored = prequential(job, LAMP_2M, Settings(score_max=2))
    assert scored.item_ids == ["n1", "n2"]  # the newest unseen, at most score_max
    assert scored.golds == ["comedy", "comedy"]
    assert scored.production == scored.non_personalized == ["comedy"] * 2
    prompts = [system + user for _, system, user in engine.calls]
    assert scored.lm_calls == len(prompts) > 0
    # every prompt names at most the one new item it asks about: no new item is recalled or shown
    assert all(len(set(re.findall(r"NEWFILM-\d", p))) <= 1 for p in prompts)
    assert any("A seen heist film" in p for p in prompts)  # what production was aligned on is recalled
    # nothing to score: a new user, a state from before item ids were kept, nothing new
    assert prequential(replace(job, persona_profile=None), LAMP_2M, Settings()) is None
    assert prequential(replace(job, seen_ids=None), LAMP_2M, Settings()) is None
    assert prequential(replace(job, items=seen), LAMP_2M, Settings()) is None


def test_two_nights_log_the_prequential_scores(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    settings = Settings(store=tmp_path / "mlruns", lm=LMConfig("scripted", cache=False), batch_size=2, iterations=1,
                        workers=2)
    ingest_into(settings, write_dataset(tmp_path / "data", LAMP_2M, n_users=3, n_history=6, n_queries=1, seed=8))
    first = run_nightly(settings, LAMP_2M, lm=build_lm(settings.lm))
    assert first.night == 1
    assert not first.scored  # new users: no production persona to score yet
    states = StateStore.of(settings, LAMP_2M.key)
    assert len(states.get("u0001").item_ids) == 6
    rows = [{"user_id": f"u{u:04d}", "id": f"new-{u}-{d}", "response": "comedy", "timestamp": f"2027-01-0{d + 1}",
             "input": LAMP_2M.make_input(f"A night-two film {u}-{d}.", LAMP_2M.labels)}
            for u in range(3) for d in range(2)]
    ingest_into(settings, write_events(tmp_path / "night2.jsonl", rows))
    capsys.readouterr()
    assert main(["nightly", "--store", str(settings.store), "--lm", "scripted", "-n", "2", "-T", "1"]) == 0
    printed = capsys.readouterr().out.splitlines()  # not a terminal: one line per sentence, never wrapped
    assert "new interactions scored: 6; production persona accuracy 1.000, non-personalized 1.000 (" in printed[0]
    assert printed[1].startswith("aligned ")
    assert printed[1].endswith(" s")
    mlflow.set_tracking_uri(settings.tracking_uri)
    run = mlflow.search_runs(search_all_experiments=True, order_by=["start_time DESC"]).iloc[0]
    assert run["tags.night"] == "2"
    assert run["metrics.prequential_items"] == 6
    assert run["tags.mlflow.runName"].startswith("nightly-lamp2m-night2-")
    assert run["tags.command"] == "nightly"
    assert f"MLflow run {run.run_id} (night 2); see it: mlflow ui --backend-store-uri " in printed[-1]
    assert run["params.rollback_on_regression"] == "0"
    assert "params.rollback_after" not in run
    users = mlflow.artifacts.load_text(f"runs:/{run.run_id}/users.csv").splitlines()
    assert users[0] == "user_id,status,version,lm_calls,cached_calls,tokens,fallbacks,error,worker"
    history = mlflow.MlflowClient().get_metric_history(run.run_id, "prequential_production_accuracy")
    assert [(m.step, m.value) for m in history] == [(2, 1.0)]
    table = json.loads(mlflow.artifacts.load_text(f"runs:/{run.run_id}/prequential.json"))
    scored = {(r[table["columns"].index("user_id")], r[table["columns"].index("item_id")]) for r in table["data"]}
    assert scored == {(r["user_id"], r["id"]) for r in rows}  # exactly the unseen items, each once
    assert set(states.get("u0001").item_ids) >= {"new-1-0", "new-1-1"}  # seen by tomorrow's production
    # and `report` turns the nights into the trend
    capsys.readouterr()
    assert main(["report", "--store", str(settings.store)]) == 0
    csv = (settings.store / "reports" / "prequential-lamp2m.csv").read_text().splitlines()
    assert csv[0] == "night,user_id,n,production_score,non_personalized_score"
    assert len(csv) == 1 + 3 + 1
    # night 3: its run draws the whole series as a line, night 2's point included
    ingest_into(settings, write_events(tmp_path / "night3.jsonl", [
        {**r, "id": r["id"] + "-3", "timestamp": "2027-02-01", "response": "action"} for r in rows[::2]]))
    assert main(["nightly", "--store", str(settings.store), "--lm", "scripted", "-n", "2", "-T", "1"]) == 0
    third = mlflow.search_runs(search_all_experiments=True, order_by=["start_time DESC"]).iloc[0]
    history = mlflow.MlflowClient().get_metric_history(third.run_id, "prequential_production_accuracy")
    assert [m.step for m in sorted(history, key=lambda m: m.step)] == [2, 3]
    assert third["tags.night"] == "3"
    assert {m.step: m.value for m in history}[2] == 1.0


def test_a_night_with_nothing_new_or_a_killed_one_does_not_move_the_count(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    settings = Settings(store=tmp_path / "mlruns", lm=LMConfig("scripted", cache=False), batch_size=2, iterations=1)
    ingest_into(settings, write_dataset(tmp_path / "data", LAMP_2M, n_users=2, n_history=4, n_queries=1, seed=8))
    assert run_nightly(settings, LAMP_2M, lm=build_lm(settings.lm)).night == 1
    empty = run_nightly(settings, LAMP_2M, lm=build_lm(settings.lm))  # nothing new: nobody aligned
    assert not empty.aligned
    assert not empty.rejected
    assert empty.night == 2
    mlflow.set_tracking_uri(settings.tracking_uri)
    mlflow.set_experiment(settings.experiment)
    with mlflow.start_run(tags={"nightly_task": LAMP_2M.key, "night": "2"}):  # a night killed half way
        mlflow.log_metrics({"users_aligned": 1})
        mlflow.end_run("KILLED")
    rows = [{"user_id": "u0000", "id": f"new-{d}", "response": "comedy", "timestamp": f"2027-01-0{d + 1}",
             "input": LAMP_2M.make_input(f"A night-two film {d}.", LAMP_2M.labels)} for d in range(2)]
    ingest_into(settings, write_events(tmp_path / "new.jsonl", rows))
    assert run_nightly(settings, LAMP_2M, lm=build_lm(settings.lm)).night == 2  # the second night that aligned anyone
