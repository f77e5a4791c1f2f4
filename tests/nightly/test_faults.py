"""LLM faults: transient errors are retried, unusable answers are counted fallbacks, and a user
whose LLM calls keep failing keeps their persona, is named, and never stops the others."""

import json
from dataclasses import replace

import dspy
import mlflow
import pytest

from persona_agent.adapters.fakes import FAULTS, FaultyEngine
from persona_agent.adapters.llm import build_lm
from persona_agent.adapters.registry import PersonaRegistry
from persona_agent.adapters.state import StateStore
from persona_agent.data.synthetic import write_dataset
from persona_agent.data.tasks import LAMP_2M
from persona_agent.nightly.driver import print_summary, run_nightly
from persona_agent.settings import LMConfig, Settings

from ..helpers import ingest_into

POISON = "a film that always crashes the model"


@pytest.fixture
def night(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    data = write_dataset(tmp_path / "data", LAMP_2M, n_users=3, n_history=8, n_queries=1, seed=6)
    settings = Settings(store=tmp_path / "mlruns", lm=LMConfig("scripted", cache=False), batch_size=2,
                        iterations=2, max_iters=1)
    ingest_into(settings, data)
    return settings


def _faulty_lm(**faults):
    engine = FaultyEngine(**faults)
    return dspy.LM("scripted/policy", engine=engine, cache=False, num_retries=3), engine


def _production(settings):
    mlflow.set_tracking_uri(settings.tracking_uri)
    registry = PersonaRegistry(LAMP_2M)
    return {u: registry.production_version(u) for u in registry.users()["user_id"]}


def test_every_fault_kind_is_survived_and_counted(night):
    lm, engine = _faulty_lm(rate=0.3, seed=3)
    with dspy.context(adapter=dspy.JSONAdapter()):
        summary = run_nightly(replace(night, workers=1), LAMP_2M, lm=lm)
    assert set(engine.injected) == set(FAULTS)  # every kind was injected at least once
    # 3 retries absorb the transient faults; the unusable answers became counted fallbacks
    assert not summary.failed
    assert len(summary.aligned) + len(summary.rejected) == 3
    assert summary.fallbacks >= engine.injected["empty"] + engine.injected["malformed"] > 0
    production = _production(night)
    assert len(production) == 3
    assert all(v is not None for v in production.values())


def test_a_user_whose_calls_keep_failing_keeps_their_persona_and_the_others_go_on(night, tmp_path, capsys):
    run_nightly(replace(night, workers=2), LAMP_2M, lm=build_lm(night.lm))
    before = _production(night)
    events = tmp_path / "new.jsonl"
    events.write_text("\n".join(json.dumps({"user_id": u, "input": LAMP_2M.make_input(text, LAMP_2M.labels),
                                            "response": "action", "timestamp": "2026-01-01"})
                                for u, text in [("u0001", f"{POISON}."), ("u0002", "A film about a bank heist.")]))
    ingest_into(night, events)
    lm, engine = _faulty_lm(rate=0.0, poison=POISON)
    summary = run_nightly(replace(night, workers=2), LAMP_2M, lm=lm)
    assert list(summary.failed) == ["u0001"]
    assert "ServerError" in summary.failed["u0001"]
    assert summary.aligned + summary.rejected == ["u0002"]
    assert summary.counts()["users_unchanged"] == 1  # u0000
    after = _production(night)
    assert after["u0001"] == before["u0001"]  # kept, intact
    PersonaRegistry(LAMP_2M).get("u0001")
    print_summary(summary)
    assert "failed: u0001" in capsys.readouterr().out
    # the next night (the LLM healthy again) retries the failed user, and only them
    summary = run_nightly(replace(night, workers=2), LAMP_2M, lm=build_lm(night.lm))
    assert summary.aligned + summary.rejected == ["u0001"]
    assert not summary.failed


def test_a_faulty_remote_server_is_survived(night, monkeypatch, fake_llm_server):
    """The real client path (DSPy's OpenAI-compatible client over HTTP): hangs past the timeout,
    429/500/503 with Retry-After, empty and truncated answers."""
    server, url = fake_llm_server.serve_in_background(latency=0.0, faults=0.3, seed=24, hang=3.0)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-fake")
    try:
        settings = Settings(store=night.store, lm=LMConfig("openai/gpt-4o-mini", api_base=url, cache=False,
                                                           retries=4, timeout=1.0),
                            batch_size=2, iterations=1, max_iters=1)
        summary = run_nightly(replace(settings, workers=3), LAMP_2M)
    finally:
        server.shutdown()
    injected = server.handler.injected
    assert set(injected) == set(fake_llm_server.SERVER_FAULTS), injected
    assert not summary.failed
    assert len(summary.aligned) + len(summary.rejected) == 3
    assert summary.fallbacks > 0


def test_a_user_that_cannot_be_planned_is_failed_alone(night, tmp_path):
    run_nightly(replace(night, workers=2), LAMP_2M, lm=build_lm(night.lm))
    from persona_agent.adapters.registry import prompt_name

    # someone edits u0001's production prompt by hand into something that is not a persona
    version = mlflow.genai.register_prompt(prompt_name("lamp2m", "u0001"), template="Be nice.").version
    mlflow.genai.set_prompt_alias(prompt_name("lamp2m", "u0001"), "production", version)
    events = tmp_path / "more.jsonl"
    events.write_text("\n".join(json.dumps({"user_id": u, "input": LAMP_2M.make_input("A heist film.", LAMP_2M.labels),
                                            "response": "action"}) for u in ("u0001", "u0002")))
    ingest_into(night, events)
    summary = run_nightly(replace(night, workers=2), LAMP_2M, lm=build_lm(night.lm))
    assert list(summary.failed) == ["u0001"]
    assert "planning failed" in summary.failed["u0001"]
    assert summary.aligned + summary.rejected == ["u0002"]
    runs = mlflow.search_runs(search_all_experiments=True, order_by=["start_time DESC"])
    users_csv = mlflow.artifacts.load_text(f"runs:/{runs.run_id[0]}/users.csv")
    assert "u0001,failed" in users_csv
    assert "planning failed" in users_csv


def test_a_history_that_shrank_is_a_damaged_store_named_and_nobody_is_aligned_on_it(night, monkeypatch, tmp_path):
    """Nothing deletes a memory but `forget`, so items aligned on that are gone mean damage (a
    truncated id tracker lost 14 of 18 memories without a word): the user fails, named, and keeps
    their persona. Noticed for a user with a change to plan, and for every user with --all-users."""
    from persona_agent.pipelines.memory import EpisodicMemory

    run_nightly(night, LAMP_2M, lm=build_lm(night.lm))
    before = _production(night)
    items, user_ids = EpisodicMemory.items, EpisodicMemory.user_ids
    monkeypatch.setattr(EpisodicMemory, "items", lambda self, u: items(self, u)[:3] if u == "u0001" else items(self, u))
    monkeypatch.setattr(EpisodicMemory, "user_ids", lambda self: [u for u in user_ids(self) if u != "u0002"])
    StateStore.of(night, LAMP_2M.key).mark_changed(["u0001"])  # an ingest for u0001
    summary = run_nightly(night, LAMP_2M, lm=build_lm(night.lm))
    assert list(summary.failed) == ["u0001"]
    assert "5 of 8 items aligned on are missing" in summary.failed["u0001"]
    summary = run_nightly(replace(night, plan_all=True), LAMP_2M, lm=build_lm(night.lm))
    assert sorted(summary.failed) == ["u0001", "u0002"]
    assert summary.unchanged == ["u0000"]
    assert "5 of 8 items aligned on are missing" in summary.failed["u0001"]
    assert "all of the items" in summary.failed["u0002"]
    assert "damaged" in summary.failed["u0002"]
    assert not summary.aligned
    assert not summary.rejected
    assert _production(night) == before
    # each user counted once: u0002 failed, so it is not also "untouched" (counted as unchanged)
    counts = summary.counts()
    assert counts["users_failed"] + counts["users_unchanged"] + counts["users_aligned"] + counts["users_rejected"] == 3
