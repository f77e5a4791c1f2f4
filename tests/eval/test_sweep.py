import mlflow
import pytest

from persona_agent.data.tasks import LAMP_2M
from persona_agent.eval.sweep import cold_start, sweep
from persona_agent.overrides import engine_of
from persona_agent.runtime.store import Store
from tests.eval.test_eval import _policy, _users


def test_cold_start_keeps_the_latest_items():
    (alice, _) = _users()
    assert [it["id"] for it in cold_start(alice, 2).history] == ["a2", "a3"]
    assert cold_start(alice, 0).history == []


@pytest.mark.parametrize("param,values", [("top_k", [0, 2]), ("history", [0, 4])])
def test_sweep_writes_table_plot_and_mlflow_run(mlflow_store, fake_lm, tmp_path, param, values, monkeypatch):
    import persona_agent.eval.sweep as sw

    engine_of(fake_lm).policy = _policy([])
    monkeypatch.setattr(sw, "build_lm", lambda cfg: fake_lm)
    monkeypatch.setattr(sw, "adapter_for", lambda lm: __import__("dspy").JSONAdapter())
    with Store.open(mlflow_store, memory="run") as store:
        table = sweep(mlflow_store, store, LAMP_2M, users=_users(), methods=["rag"], param=param, values=values,
                      out=tmp_path / "out")
    assert list(table[param]) == values
    # with nothing to recall, the scripted agent cannot tell the users apart; with memory it can
    assert table.accuracy.iloc[0] == 0.5
    assert table.accuracy.iloc[1] == 1.0
    png = tmp_path / "out" / f"sweep_{param}.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    run = mlflow.search_runs(experiment_names=["persona-agent"]).iloc[0]
    assert run["params.param"] == param
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.run_id)}
    assert {f"sweep_{param}.csv", f"sweep_{param}.png"} <= artifacts
