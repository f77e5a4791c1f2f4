"""`persona-agent report`: the nightly prequential trend as a CSV, a PNG and an MLflow run."""

import mlflow
import pandas as pd
import pytest

from persona_agent.data.tasks import LAMP_2M
from persona_agent.nightly.report import write_report

# (night, user, production scores, non-personalized scores) as nightly would have logged them
NIGHTS = [(2, "u1", [1, 1], [0, 1]), (2, "u2", [1, 0], [0, 0]),
          (3, "u1", [1, 1, 1], [1, 0, 0]), (3, "u2", [0, 0], [0, 0]),
          (4, "u1", [1], [0])]


def _log_nights():
    for night in sorted({n for n, *_ in NIGHTS}):
        rows = [{"night": n, "user_id": u, "item_id": f"{u}-{n}-{i}", "gold": "comedy", "production": "comedy",
                 "non_personalized": "drama", "production_score": float(p), "non_personalized_score": float(b)}
                for n, u, ps, bs in NIGHTS if n == night for i, (p, b) in enumerate(zip(ps, bs))]
        with mlflow.start_run(tags={"nightly_task": "lamp2m", "night": str(night)}):
            mlflow.log_table(pd.DataFrame(rows), "prequential.json")
    with mlflow.start_run(tags={"nightly_task": "lamp2m", "night": "1"}):  # the first night scores nothing
        pass


def test_the_report_has_each_night_overall_and_per_user_and_names_who_fell(mlflow_store, tmp_path):
    with pytest.raises(LookupError, match="has scored anything yet"):
        write_report(LAMP_2M, tmp_path / "empty")
    _log_nights()
    report = write_report(LAMP_2M, tmp_path / "out", k=2)
    table = pd.read_csv(report.csv)
    overall = table[table.user_id == "all"].set_index("night")
    assert list(overall.index) == [2, 3, 4]
    assert list(overall.n) == [4, 5, 1]
    assert overall.production_score.tolist() == pytest.approx([0.75, 0.6, 1.0])
    assert overall.non_personalized_score.tolist() == pytest.approx([0.25, 0.2, 0.0])
    u2 = table[table.user_id == "u2"].set_index("night")
    assert u2.production_score.tolist() == [0.5, 0.0]
    assert list(u2.n) == [2, 2]
    assert report.fell.user_id.tolist() == ["u2"]  # 0.0 on night 3 after 0.5; u1 never fell
    assert report.png.stat().st_size > 10_000
    run = mlflow.search_runs(filter_string="tags.command = 'report'").iloc[0]
    assert run["metrics.users_fell"] == 1
    assert run["params.last"] == "2"  # named as the --last option
    assert run["tags.mlflow.runName"].startswith("report-lamp2m-last2-")
    files = {f.path for f in mlflow.MlflowClient().list_artifacts(run.run_id)}
    assert files == {"prequential-lamp2m.csv", "prequential-lamp2m.png"}
