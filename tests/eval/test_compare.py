import mlflow

from persona_agent.cli import main
from persona_agent.eval.compare import compare_runs


def _run(name, overall, users, **params):
    with mlflow.start_run(run_name=name) as parent:
        mlflow.log_metric("accuracy", overall)
        mlflow.log_params({"task": "lamp2m", **params})
        for user, acc in users.items():
            with mlflow.start_run(run_name=user, nested=True):
                mlflow.log_metric("accuracy", acc)
    return parent.info.run_id


def test_compare_gives_per_user_and_overall_deltas(mlflow_store, capsys):
    a = _run("a", 0.5, {"u1": 0.25, "u2": 0.75})
    b = _run("b", 0.75, {"u1": 0.5, "u3": 1.0})
    table = compare_runs(a, b).set_index("scope")
    assert table.loc["overall", "delta"] == 0.25
    assert table.loc["u1", "delta"] == 0.25
    assert "u2" not in table.index
    assert "u3" not in table.index  # only users both runs have
    assert main(["compare", a, "nonexistent-run", "--store", str(mlflow_store.store)]) == 2
    assert "persona-agent:" in capsys.readouterr().err


def test_compare_prints_the_parameters_that_differ_and_the_overall_deltas(mlflow_store, capsys):
    a = _run("a", 0.5, {"u1": 0.25, "u2": 0.75}, iterations=1)
    b = _run("b", 0.75, {"u1": 0.5, "u2": 0.75}, iterations=2)
    assert main(["compare", a, b, "--store", str(mlflow_store.store)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "parameters that differ (a -> b):"
    assert out[2].split() == ["iterations", "1", "2"]
    assert "task" not in " ".join(out[:3])  # equal on both sides: not listed
    assert out[-1] == "per user: 1 of 2 metrics moved, in 1 of 2 runs in common (--per-user lists them)"
    assert main(["compare", a, b, "--per-user", "--store", str(mlflow_store.store)]) == 0
    assert any(line.split()[:2] == ["u2", "accuracy"] for line in capsys.readouterr().out.splitlines())
