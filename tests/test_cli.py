import os
import subprocess
import sys

import pytest

from persona_agent.cli import build_parser, main
from persona_agent.data.loaders import load_users
from persona_agent.data.tasks import LAMP_3
from persona_agent.settings import Settings


@pytest.mark.parametrize("argv", [[], ["demo"], ["make-data"], ["personas"], ["personas", "list"]])
def test_every_command_has_help(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args([*argv, "--help"])
    assert exit_.value.code == 0
    assert "usage: persona-agent" in capsys.readouterr().out


def test_make_data_writes_loadable_lamp_files(tmp_path):
    assert main(["make-data", str(tmp_path), "--task", "lamp3", "--users", "4", "--queries", "2"]) == 0
    users = load_users(tmp_path, LAMP_3)
    assert len(users) == 4
    assert all(len(u.queries) == 2 for u in users)
    assert (tmp_path / "rules.json").exists()


def test_unknown_task_is_a_clear_error(tmp_path, capsys):
    assert main(["make-data", str(tmp_path), "--task", "lamp9"]) == 2
    assert "unknown task 'lamp9'" in capsys.readouterr().err


def test_console_script_is_installed():
    out = subprocess.run([sys.executable, "-m", "persona_agent.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    assert "demo" in out.stdout


def test_an_unreachable_llm_is_a_clear_error(tmp_path, capsys, monkeypatch):
    import socket

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("OPENAI_API_KEY", "sk-fake")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    code = main(["eval", "--methods", "non-personalized", "--users", "1", "--queries", "1", "--retries", "0",
                 "--lm", "openai/gpt-4o-mini", "--api-base", f"http://127.0.0.1:{port}/v1",
                 "--store", str(tmp_path / "mlruns")])
    err = capsys.readouterr().err
    assert code == 4
    assert "the LLM failed after 0 retries" in err


@pytest.mark.parametrize("argv", [["eval"], ["sweep", "batch", "1"], ["nightly"], ["ingest", "x.jsonl"], ["answer", "u", "q"],
                                  ["personas", "list"], ["compare", "a", "b"], ["demo"]])
def test_every_default_comes_from_settings(argv):
    from persona_agent.cli import COMMANDS
    from persona_agent.commands.options import settings_from

    command = COMMANDS[argv[0]]
    assert settings_from(build_parser().parse_args(argv), command.defaults()) == command.defaults()
    assert command.defaults() == (Settings.for_demo() if argv == ["demo"] else Settings())


def test_the_answer_step_reaches_every_agent_command():
    from persona_agent.cli import COMMANDS
    from persona_agent.commands.options import settings_from
    from persona_agent.pipelines.evidence import ANSWER_STEPS

    for argv in (["demo"], ["eval"], ["nightly"], ["answer", "u", "q"]):
        args = build_parser().parse_args([*argv, "--answer-step", "prompt", "--prior-strength", "3.5"])
        settings = settings_from(args, COMMANDS[argv[0]].defaults())
        assert (settings.answer_step, settings.prior_strength) == ("prompt", 3.5)
    choices = next(a.choices for a in build_parser()._subparsers._group_actions[0].choices["eval"]._actions
                   if a.dest == "answer_step")
    assert tuple(choices) == ANSWER_STEPS  # the CLI (which imports no DSPy) spells the same steps


def test_max_tokens_reaches_the_lm_config_of_every_command():
    from persona_agent.cli import COMMANDS
    from persona_agent.commands.options import settings_from

    for argv in (["demo"], ["eval"], ["nightly"], ["answer", "u", "q"]):
        args = build_parser().parse_args([*argv, "--max-tokens", "64"])
        assert settings_from(args, COMMANDS[argv[0]].defaults()).lm.max_tokens == 64


@pytest.mark.parametrize("option", [["--batch", "0"], ["--iterations", "-1"], ["--top-k", "-5"], ["--workers", "0"],
                                    ["--timeout", "0"], ["--max-iters", "x"], ["--max-tokens", "0"],
                                    ["--prior-strength", "nan"], ["--prior-strength", "inf"], ["--prior-strength", "-1"],
                                    ["--answer-step", "logits"], ["--timeout", "nan"], ["--wait", "nan"],
                                    ["--timeout", "1e400"], ["--wait", "inf"], ["--workers", "99999999999999999999"],
                                    ["--max-calls", "1e3"], ["--timeout", "-5"]])
def test_bad_option_values_are_refused_at_parse_time(option, capsys):
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["nightly", *option])
    assert exit_.value.code == 2
    assert option[0] in capsys.readouterr().err


# -- what an engineer sees (issue: MLflow and the console) ----------------------------------------


def test_version_is_printed(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.startswith("persona-agent 0.")


@pytest.mark.parametrize("command", [["ingest", "x.jsonl"], ["report"], ["compare", "a", "b"], ["personas", "list"],
                                     ["make-data", "out"]])
def test_commands_that_call_no_llm_offer_no_llm_options(command, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args([*command, "--help"])
    text = capsys.readouterr().out
    assert "--lm" not in text
    assert "--max-tokens" not in text
    assert "--no-cache" not in text


@pytest.mark.parametrize("command", [["make-data"], ["compare"]])
def test_every_argument_has_help(command, capsys):
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices[command[0]]
    for action in sub._actions:
        assert action.help, (command, action.dest)


def test_the_lm_help_names_the_scripted_stand_in(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["nightly", "--help"])
    assert "'scripted'" in capsys.readouterr().out


@pytest.mark.parametrize("model", ["bogus-model", "local:/no/such/model.gguf", "scripted:x"])
def test_a_model_no_call_could_reach_is_refused_before_any_work(model, tmp_path, capsys):
    store = tmp_path / "store"
    assert main(["nightly", "--store", str(store), "--lm", model]) == 2  # nothing to align: still refused
    assert "--lm" in capsys.readouterr().err
    assert not (store / "mlflow.db").exists()  # no run was logged with that model


def test_eval_output_is_results_only_and_fits_a_terminal(tmp_path):
    """stdout holds the table and the closing lines: no progress bar fragments, no library INFO;
    the compact table fits 80 columns (with the longest method name), and `--wide` prints every column."""
    env = {**os.environ, "COLUMNS": "200"}
    env.pop("MLFLOW_TRACKING_URI", None)
    cmd = [sys.executable, "-m", "persona_agent.cli", "eval", "--lm", "scripted", "--users", "2", "--queries", "1",
           "--methods", "non-personalized,persona-agent (tools only),w/o alignment,gepa", "--store", str(tmp_path / "s"),
           "-T", "1"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    assert lines[0].startswith("LaMP-2M, 2 users")
    assert "it/s" not in out.stdout
    assert "INFO" not in out.stdout
    assert "Average Metric" not in out.stdout + out.stderr  # DSPy's evaluator bars, inside GEPA
    table = lines[1:lines.index(next(line for line in lines if line.startswith("gepa"))) + 1]
    assert max(len(line) for line in table) <= 80, table
    assert any(line.startswith("2 of 2 users scored") and "mlflow ui --backend-store-uri" in line for line in lines)
    wide = subprocess.run([*cmd, "--wide"], capture_output=True, text=True, env=env, timeout=600)
    assert wide.returncode == 0, wide.stderr[-2000:]
    assert "setup LM calls" in wide.stdout
    assert "setup LM calls" not in out.stdout


@pytest.mark.parametrize("query", ["caf\udce9 film", "   ", "x" * 120_000])
def test_a_query_that_is_no_text_is_one_line_and_exit_2(query, tmp_path, capsys):
    assert main(["answer", "u0000", query, "--store", str(tmp_path / "s"), "--lm", "scripted"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "not UTF-8" in err or "empty" in err or "limit 100,000" in err
    assert not (tmp_path / "s").exists()  # refused before the store is opened


def test_eval_reads_the_shipped_set_it_is_told_to_and_keeps_its_memory_apart(tmp_path, monkeypatch):
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 's' / 'mlflow.db'}")
    for which in ("stable", "readable-drift"):
        assert main(["eval", "--set", which, "--lm", "scripted", "--methods", "lookup", "--users", "1",
                     "--queries", "1", "--store", str(tmp_path / "s"), "--out", str(tmp_path / which)]) == 0
    runs = mlflow.search_runs(experiment_names=["persona-agent"], filter_string="tags.command = 'eval'")
    assert sorted(runs["params.data"]) == ["shipped", "shipped:readable-drift"]
    assert runs["params.data_fingerprint"].nunique() == 2  # another set's users, not the same ones twice
    with pytest.raises(SystemExit) as refused:
        main(["eval", "--set", "nope", "--lm", "scripted"])
    assert refused.value.code == 2


def test_every_exit_code_the_cli_maps_an_error_to_is_in_the_operations_table():
    """The exceptions -> exit code table is the one place codes are given; docs/operations.md's
    table must list each of them (and no code the CLI never returns)."""
    import re
    from pathlib import Path

    from persona_agent.cli import exit_codes
    from persona_agent.runtime.store import StoreFull

    mapped = {code for _, code, _ in exit_codes() if isinstance(code, int)} | {2, 7}  # OSError: 2, or 7 on a full disk
    page = (Path(__file__).parents[1] / "docs" / "operations.md").read_text()
    documented = {int(m) for m in re.findall(r"^\| (\d+) \|", page, flags=re.M)}
    commands = {0, 1, 3}  # done; nightly's failed users and doctor's unfinished erase; nightly's lock
    assert mapped <= documented, mapped - documented
    assert documented - mapped - commands == set(), documented - mapped - commands
    # and the first match wins: a full store is 7, not the OSError it also is
    from persona_agent.cli import exit_for
    from persona_agent.settings import Settings

    assert exit_for(StoreFull("the disk is full"), Settings())[0] == 7
    assert exit_for(OSError(28, "No space left on device"), Settings())[0] == 7
    assert exit_for(OSError(2, "No such file or directory", "x.json"), Settings()) == (2, "x.json: No such file or directory")
    assert exit_for(RuntimeError("a bug"), Settings()) == (None, "")
