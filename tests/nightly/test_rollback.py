"""`nightly --rollback-on-regression K`: a production persona that scores below its recent nights
on the new interactions is replaced by the last version that scored better; nothing is deleted."""


import dspy
import mlflow

from persona_agent.adapters.fakes import FakeEngine, default_policy
from persona_agent.adapters.registry import PersonaRegistry
from persona_agent.adapters.state import StateStore, UserState
from persona_agent.data.tasks import LAMP_2M
from persona_agent.nightly.driver import run_nightly
from persona_agent.nightly.jobs import last_better
from persona_agent.settings import LMConfig, Settings

from ..helpers import ingest_into, write_events


def test_last_better_rolls_back_only_below_the_recent_mean_and_to_a_better_version():
    scores = [{"version": 1, "score": 0.9}, {"version": 2, "score": 0.4}, {"version": 3, "score": 0.8}]
    assert last_better(scores, {"version": 4, "score": 0.5}, 2) == 3  # below (0.4 + 0.8) / 2; v3 did better
    assert last_better(scores, {"version": 4, "score": 0.7}, 2) is None  # not below the mean of the last 2
    assert last_better(scores, {"version": 4, "score": 0.5}, 1) == 3
    assert last_better(scores[:2], {"version": 2, "score": 0.1}, 3) == 1  # the same version is no way back
    assert last_better([], {"version": 1, "score": 0.0}, 3) is None
    assert last_better(scores, {"version": 4, "score": 0.0}, 0) is None


def test_a_regressed_production_persona_is_rolled_back(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    rewrite = {"to": "Likes comedy a lot."}

    def policy(fields, system, user):
        out = default_policy(fields, system, user)
        if "answer" in fields:
            out["answer"] = "action" if "Prefers action." in system else "comedy"
        if "profile" in fields:
            out["profile"] = "Likes comedy."
        if "new_profile" in fields:
            out["new_profile"] = rewrite["to"]
        return out

    lm = dspy.LM("fake/policy", engine=FakeEngine(policy), cache=False, num_retries=0)
    settings = Settings(store=tmp_path / "mlruns", lm=LMConfig("scripted"), batch_size=2, iterations=1, guard=False,
                        rollback_after=2, workers=1)

    def night(k: int, n: int):
        rows = [{"user_id": "u1", "id": f"d{k}-{i}", "response": "comedy", "timestamp": f"2027-0{k + 1}-0{i + 1}",
                 "input": LAMP_2M.make_input(f"A wedding film {k}-{i}.", LAMP_2M.labels)} for i in range(n)]
        ingest_into(settings, write_events(tmp_path / f"day{k}.jsonl", rows))
        with dspy.context(adapter=dspy.JSONAdapter()):
            return run_nightly(settings, LAMP_2M, lm=lm)

    night(0, 6)  # v1 from the profile, v2 "Likes comedy a lot." (unguarded: accepted)
    rewrite["to"] = "Prefers action."
    second = night(1, 2)  # v2 scores 1.0 on the new items; v3 "Prefers action." is accepted
    mlflow.set_tracking_uri(settings.tracking_uri)
    registry = PersonaRegistry(LAMP_2M)
    assert not second.rolled_back
    assert registry.production_version("u1") == 3
    third = night(2, 2)  # v3 answers action: 0.0, below its recent nights: back to v2
    assert third.rolled_back == {"u1": (3, 2)}
    assert registry.production_version("u1") == 2
    assert registry.get("u1", 2).tags["rolled_back_from"] == "3"
    assert registry.get("u1", 2).tags["rolled_back_at_night"] == "3"
    assert len(registry.versions("u1")) >= 3  # nothing deleted
    state = StateStore.of(settings, LAMP_2M.key).get("u1")
    assert [(s["night"], s["version"], s["score"]) for s in state.scores] == [(2, 2, 1.0), (3, 3, 0.0)]
    run = mlflow.search_runs(search_all_experiments=True, order_by=["start_time DESC"]).iloc[0]
    assert run["metrics.users_rolled_back"] == 1
    assert "u1,rolled back" in mlflow.artifacts.load_text(f"runs:/{run.run_id}/users.csv")
    assert UserState.from_json(state.to_json("u1", None)) == state  # the row reads back as it was written
