"""Nightly LM-call budgets: a user past one is deferred whole (named, counted, never half
aligned) and aligned on a later night."""

from dataclasses import replace

import dspy
import mlflow
import pytest

from persona_agent.adapters.fakes import FakeEngine
from persona_agent.adapters.registry import PersonaRegistry
from persona_agent.adapters.state import StateStore
from persona_agent.data.synthetic import write_dataset
from persona_agent.data.tasks import LAMP_2M
from persona_agent.nightly.driver import run_nightly
from persona_agent.settings import LMConfig, Settings

from ..helpers import ingest_into


@pytest.fixture
def night(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    settings = Settings(store=tmp_path / "mlruns", lm=LMConfig("scripted", cache=False), batch_size=2, iterations=1,
                        workers=1)
    ingest_into(settings, write_dataset(tmp_path / "data", LAMP_2M, n_users=3, n_history=6, n_queries=1, seed=8))
    return settings


def _lm():
    engine = FakeEngine()
    return dspy.LM("fake/policy", engine=engine, cache=False, num_retries=0), engine


def _committed(settings) -> set[str]:
    states = StateStore.of(settings, LAMP_2M.key)
    mlflow.set_tracking_uri(settings.tracking_uri)
    versions = {u for u in PersonaRegistry(LAMP_2M).users()["user_id"]}
    done = {u for u in ("u0000", "u0001", "u0002") if states.get(u)}
    assert versions == done  # a user has registered versions exactly when they were committed
    return done


def test_a_user_past_the_per_user_budget_is_deferred_whole_and_aligned_later(night):
    lm, engine = _lm()
    with dspy.context(adapter=dspy.JSONAdapter()):
        summary = run_nightly(replace(night, max_calls_per_user=3), LAMP_2M, lm=lm)
    assert sorted(summary.deferred) == ["u0000", "u0001", "u0002"]
    assert not summary.failed
    assert all("3 LM calls a user may use" in why for why in summary.deferred.values())
    assert _committed(night) == set()
    assert summary.counts()["users_deferred"] == 3
    # the calls deferred users made count, in the summary and in MLflow: every call the LM saw
    assert summary.lm_calls == len(engine.calls) == 9
    run = mlflow.search_runs(search_all_experiments=True, order_by=["start_time DESC"]).iloc[0]
    assert run["metrics.users_deferred"] == 3
    assert run["metrics.lm_calls"] == 9
    assert "u0000,deferred,,3," in mlflow.artifacts.load_text(f"runs:/{run.run_id}/users.csv")
    with dspy.context(adapter=dspy.JSONAdapter()):
        summary = run_nightly(night, LAMP_2M, lm=_lm()[0])  # no budget tonight
    assert len(summary.aligned) + len(summary.rejected) == 3
    assert _committed(night) == {"u0000", "u0001", "u0002"}


def test_the_nights_budget_stops_lm_calls_and_defers_the_rest(night):
    lm, engine = _lm()
    with dspy.context(adapter=dspy.JSONAdapter()):
        summary = run_nightly(replace(night, max_calls=15), LAMP_2M, lm=lm)
    assert len(engine.calls) <= 15  # not one call past the budget
    assert summary.lm_calls == len(engine.calls)  # the deferred users' calls included
    done = _committed(night)
    assert len(done) == 1
    assert len(summary.deferred) == 2
    assert set(summary.deferred).isdisjoint(done)
    assert any("night's budget of 15" in why for why in summary.deferred.values())
