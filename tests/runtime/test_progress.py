"""Long work shows progress: a bar on a terminal, plain lines at a steady pace in a log."""

import io
import threading

from rich.console import Console

from persona_agent.runtime import progress


def test_in_a_log_progress_is_plain_lines_at_a_steady_pace(monkeypatch):
    monkeypatch.setattr(progress.PlainProgress, "min_gap", 0.0)
    log = io.StringIO()
    console = Console(file=log, force_terminal=False)
    with progress.progress_bar(console, every=0.2) as bar:
        assert isinstance(bar, progress.PlainProgress)
        task = bar.add_task("eval", total=4)
        for _ in range(200):  # a slow LM: nothing finishes, and the log still hears from it (up to 20 s of waiting)
            if log.getvalue().count("eval: 0/4 done") >= 2:
                break
            threading.Event().wait(0.1)
        beats = log.getvalue().count("eval: 0/4 done")
        bar.update(task, advance=1, description="u0001: persona-agent")
    lines = log.getvalue().splitlines()
    assert beats >= 2
    assert "u0001: persona-agent: 1/4 done" in lines[-1]
    assert "\x1b" not in log.getvalue()
    assert "━" not in log.getvalue()  # no bar fragments in a log


def test_on_a_terminal_it_is_rich_s_bar():
    console = Console(file=io.StringIO(), force_terminal=True)
    assert not isinstance(progress.progress_bar(console), progress.PlainProgress)


def test_a_redirected_eval_writes_progress_lines_while_it_runs(tmp_path):
    """As cron or nohup run it: stderr a pipe. Lines must arrive before the command ends, say how
    far it is and how long is left, and hold no bar fragments."""
    import os
    import subprocess
    import sys
    import time

    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    cmd = [sys.executable, "-m", "persona_agent.cli", "eval", "--lm", "scripted:0.05", "--no-cache", "--users", "2",
           "--queries", "1", "--methods", "non-personalized,persona-agent", "-T", "2", "--store", str(tmp_path / "s"),
           "--progress-every", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    heard = [(time.monotonic(), line) for line in proc.stderr]  # read as they come, until the pipe closes
    ended = time.monotonic()
    assert proc.wait(timeout=600) == 0, "".join(line for _, line in heard)[-2000:]
    lines = [(at, line) for at, line in heard if " done, " in line]
    while_running = [line for at, line in lines if at < ended - 1.0]
    assert len(while_running) >= 2, heard  # not one line at the end
    assert any(" left" in line for line in while_running), while_running
    assert all("elapsed" in line for _, line in lines)
    text = "".join(line for _, line in heard)
    assert "━" not in text and "\r" not in text and "\x1b" not in text  # no bar fragments in a log
