import pytest


def test_airflow_dag_wires_ingest_then_nightly():
    pytest.importorskip("airflow")
    from examples.airflow_dag import dag

    assert [t.task_id for t in dag.topological_sort()] == ["ingest", "nightly"]
    assert dag.max_active_runs == 1
