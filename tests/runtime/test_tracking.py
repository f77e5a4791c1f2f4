"""What the runs record: a data fingerprint of content, the same in every process."""

import subprocess
import sys
from dataclasses import replace

import pytest

from persona_agent.adapters.tracking import data_fingerprint
from persona_agent.data.loaders import Query, load_users
from persona_agent.data.synthetic import shipped_data_dir
from persona_agent.data.tasks import LAMP_2M

_IN_A_NEW_PROCESS = """
from persona_agent.data.loaders import load_users
from persona_agent.data.synthetic import shipped_data_dir
from persona_agent.data.tasks import LAMP_2M
from persona_agent.adapters.tracking import data_fingerprint
print(data_fingerprint(load_users(shipped_data_dir(LAMP_2M), LAMP_2M)))
"""


def _in_a_new_process() -> str:
    return subprocess.run([sys.executable, "-c", _IN_A_NEW_PROCESS], capture_output=True, text=True,
                          check=True).stdout.strip()


def test_the_data_fingerprint_is_the_same_for_the_same_data_in_two_processes():
    here = data_fingerprint(load_users(shipped_data_dir(LAMP_2M), LAMP_2M))
    assert _in_a_new_process() == _in_a_new_process() == here


def test_the_data_fingerprint_changes_with_any_gold_query_or_history_item():
    users = load_users(shipped_data_dir(LAMP_2M), LAMP_2M)[:3]
    base = data_fingerprint(users)
    q = users[1].queries[0]
    assert data_fingerprint(list(reversed(users))) == base  # order of loading is no change
    changed = [
        [users[0], replace(users[1], queries=[Query(q.id, q.input, "comedy" if q.gold != "comedy" else "action"),
                                              *users[1].queries[1:]]), users[2]],
        [users[0], replace(users[1], queries=users[1].queries[1:]), users[2]],
        [users[0], replace(users[1], history=users[1].history[1:]), users[2]],
        users[:2],
    ]
    assert len({base, *(data_fingerprint(c) for c in changed)}) == 1 + len(changed)


# -- traces: one per unit of work, on its run, tagged with whose work it is ----------------------


def _traces(run_id: str):
    import mlflow

    return mlflow.search_traces(run_id=run_id, return_type="list")


def _all_traces():
    import mlflow

    return mlflow.search_traces(locations=[mlflow.get_experiment_by_name("persona-agent").experiment_id],
                                return_type="list")


@pytest.fixture
def traced_commands():
    """`--trace` turns tracing on for the process: off again after the test."""
    from persona_agent.adapters import tracking

    yield
    tracking.disable_traces()


def test_traces_hang_on_their_runs_with_user_method_task_and_persona_version(tmp_path, monkeypatch, capsys,
                                                                             traced_commands):
    import mlflow

    from persona_agent.cli import main
    from persona_agent.data.synthetic import write_dataset

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    store = tmp_path / "store"
    data = write_dataset(tmp_path / "data", LAMP_2M, n_users=2, n_history=6, n_queries=1, seed=4)
    common = ["--store", str(store), "--lm", "scripted", "--no-cache", "-n", "2", "-T", "1"]
    assert main(["ingest", str(data), "--store", str(store)]) == 0
    assert main(["nightly", *common, "--trace"]) == 0
    mlflow.set_tracking_uri(f"sqlite:///{store / 'mlflow.db'}")
    night = mlflow.search_runs(search_all_experiments=True, filter_string="tags.command = 'nightly'").iloc[0]
    traces = _traces(night.run_id)
    assert sorted(t.info.tags["user"] for t in traces) == ["u0000", "u0001"]  # one per user job, on the night
    for t in traces:
        assert t.info.tags["task"] == "lamp2m"
        assert t.info.tags["method"] == "persona-agent"
        assert t.info.tags["production_version"] == "1"
        assert t.info.tags["status"] in ("aligned", "rejected")
        names = {s.name for s in t.data.spans}
        assert {"replay", "critique", "update"} <= names, names  # the alignment's phases, as spans
        assert len(t.data.spans) > 10  # and DSPy's modules and LM calls inside them

    assert main(["eval", "--data", str(data), "--methods", "non-personalized,persona-agent,lookup", *common, "--trace"]) == 0
    parent = mlflow.search_runs(search_all_experiments=True, filter_string="tags.command = 'eval'").iloc[0]
    children = mlflow.search_runs(search_all_experiments=True,
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.run_id}'")
    for _, child in children.iterrows():
        traces = _traces(child.run_id)
        method = child["params.method"]
        assert {t.info.tags["method"] for t in traces} == {method}
        answers = [t for t in traces if "query" in t.info.tags]
        assert sorted(t.info.tags["user"] for t in answers) == ["u0000", "u0001"]  # one per method and query
        # Each answer's own trace is its row in the Evaluations view: the score eval counted, on it.
        table = mlflow.load_table("predictions.json", run_ids=[child.run_id]).set_index("query_id")
        for t in answers:
            [score] = [a.value for a in t.info.assessments if a.name == "lamp2m_score"]
            assert score == table.loc[t.info.tags["query"], "score"], (method, t.info.tags["query"])
    assert _traces(parent.run_id) == []  # none hang on the parent: each is its method's

    capsys.readouterr()
    query = load_users(data, LAMP_2M)[0].queries[0].input
    assert main(["answer", "u0001", query, "--store", str(store), "--lm", "scripted", "--trace"]) == 0
    mlflow.flush_trace_async_logging()
    (served,) = [t for t in _all_traces() if t.info.tags.get("user") == "u0001" and t.data.spans[0].name == "answer"]
    assert served.info.tags["persona_version"] == "1"
    assert len(served.data.spans) > 3


def test_no_trace_is_recorded_unless_asked(tmp_path):
    """In a process of its own, as a command runs (tracing, once on, stays on in a process)."""
    import os

    import mlflow

    from persona_agent.data.synthetic import write_dataset

    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    store = tmp_path / "store"
    data = write_dataset(tmp_path / "data", LAMP_2M, n_users=1, n_history=6, n_queries=1, seed=4)
    for argv in (["ingest", str(data)], ["nightly", "--lm", "scripted", "-n", "2", "-T", "1"]):
        subprocess.run([sys.executable, "-m", "persona_agent.cli", *argv, "--store", str(store)], env=env, check=True,
                       capture_output=True)
    mlflow.set_tracking_uri(f"sqlite:///{store / 'mlflow.db'}")
    assert _all_traces() == []


def test_every_scored_answer_is_a_row_of_mlflow_s_evaluations_view(tmp_path, monkeypatch):
    """Without --trace too: MLflow makes the row's trace, holding the query, answer, gold and score."""
    import mlflow

    from persona_agent.cli import main
    from persona_agent.data.synthetic import write_dataset

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    store = tmp_path / "store"
    data = write_dataset(tmp_path / "data", LAMP_2M, n_users=2, n_history=6, n_queries=2, seed=4)
    golds = {q.id: (q.input, q.gold) for u in load_users(data, LAMP_2M) for q in u.queries}
    assert main(["eval", "--data", str(data), "--methods", "non-personalized,lookup", "--store", str(store),
                 "--lm", "scripted", "--no-cache"]) == 0
    mlflow.set_tracking_uri(f"sqlite:///{store / 'mlflow.db'}")
    parent = mlflow.search_runs(search_all_experiments=True, filter_string="tags.command = 'eval'").iloc[0]
    children = mlflow.search_runs(search_all_experiments=True, filter_string=f"tags.mlflow.parentRunId = '{parent.run_id}'")
    assert len(children) == 2
    for _, child in children.iterrows():
        table = mlflow.load_table("predictions.json", run_ids=[child.run_id]).set_index("query_id")
        rows = _traces(child.run_id)
        assert sorted(t.info.tags["query"] for t in rows) == sorted(golds), child["params.method"]
        for t in rows:
            query = t.info.tags["query"]
            assessed = {a.name: a.value for a in t.info.assessments}
            assert assessed["expected_response"] == golds[query][1]
            assert assessed["lamp2m_score"] == table.loc[query, "score"], query
            assert t.data.request and golds[query][0] in t.data.request  # the query the row was asked
            assert t.info.tags["method"] == child["params.method"]
        assert child["metrics.lamp2m_score/mean"] == pytest.approx(table.score.mean())


@pytest.mark.parametrize("traced", [True, False])
def test_each_row_is_scored_on_the_answer_given(mlflow_store, traced_commands, traced):
    """Traced, on the query's own trace (whose root span records no output: the answer is given
    beside it); untraced, on the trace MLflow makes for the row."""
    import mlflow

    from persona_agent.adapters import tracking
    from persona_agent.adapters.scorers import task_scorer

    if traced:
        tracking.enable_traces()
    with mlflow.start_run() as run:
        for query in ("q1", "q2"):
            with tracking.trace(f"persona-agent {query}", run_id=run.info.run_id, query=query):
                pass
    if traced:
        tracking.link_traces([t.info.trace_id for t in _traces(run.info.run_id)], run.info.run_id)
    rows = [{"query": q, "inputs": {"query": f"text of {q}"}, "outputs": answer,
             "expectations": {"expected_response": "comedy"}, "tags": {"query": q}}
            for q, answer in (("q1", "comedy"), ("q2", "action"))]
    tracking.log_evaluation(rows, [task_scorer(LAMP_2M)], run.info.run_id)
    scored = {t.info.tags["query"]: {a.name: a.value for a in t.info.assessments} for t in _traces(run.info.run_id)}
    assert len(scored) == 2  # traced: on the two traces, not on new ones beside them
    assert scored["q1"]["lamp2m_score"] == 1.0, scored
    assert scored["q2"]["lamp2m_score"] == 0.0, scored
