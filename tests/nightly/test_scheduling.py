"""The Airflow example (examples/airflow_dag.py) without Airflow installed (it is in no extra):
a stand-in for the two Airflow names it uses records the tasks, and each task's command is
parsed by the CLI's own parser, so a renamed command or option fails here."""

import importlib
import shlex
import sys
import types

from persona_agent.cli import build_parser


class _Task:
    def __init__(self, task_id, bash_command):
        self.task_id, self.bash_command, self.downstream = task_id, bash_command, []
        _DAG.current.tasks.append(self)

    def __rshift__(self, other):
        self.downstream.append(other)
        return other


class _DAG:
    current = None

    def __init__(self, **kwargs):
        self.kwargs, self.tasks = kwargs, []

    def __enter__(self):
        _DAG.current = self
        return self

    def __exit__(self, *exc):
        _DAG.current = None


def _example(monkeypatch):
    airflow = types.ModuleType("airflow")
    airflow.DAG = _DAG
    bash = types.ModuleType("airflow.operators.bash")
    bash.BashOperator = _Task
    for name, module in {"airflow": airflow, "airflow.operators": types.ModuleType("airflow.operators"),
                         "airflow.operators.bash": bash}.items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.delitem(sys.modules, "examples.airflow_dag", raising=False)
    return importlib.import_module("examples.airflow_dag").dag


def test_the_airflow_example_ingests_then_aligns_once_a_night(monkeypatch):
    dag = _example(monkeypatch)
    ingest, nightly = dag.tasks
    assert (ingest.task_id, nightly.task_id) == ("ingest", "nightly")
    assert ingest.downstream == [nightly]
    assert nightly.downstream == []
    assert dag.kwargs["max_active_runs"] == 1  # `nightly` refuses a second run on one store anyway
    assert dag.kwargs["catchup"] is False


def test_each_task_of_the_example_is_a_command_the_cli_takes(monkeypatch):
    monkeypatch.setenv("PERSONA_AGENT_API_BASE", "http://127.0.0.1:8080/v1")
    for task in _example(monkeypatch).tasks:
        argv = shlex.split(task.bash_command.replace("{{ ds }}", "2026-01-01"))
        assert argv[0] == "persona-agent", task.bash_command
        args = build_parser().parse_args(argv[1:])  # exits (SystemExit) on an unknown command or option
        assert args.command == task.task_id
        assert str(args.store) == "/srv/persona-agent/mlruns"
    assert args.api_base == "http://127.0.0.1:8080/v1"
    assert args.workers == 16
