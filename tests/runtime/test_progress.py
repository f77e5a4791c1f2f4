"""Long work shows progress: a bar on a terminal, plain lines at a steady pace in a log."""

import io
import threading

from rich.console import Console

from persona_agent.runtime import progress


def test_in_a_log_progress_is_plain_lines_at_a_steady_pace(monkeypatch):
    monkeypatch.setattr(progress.PlainProgress, "every", 0.2)
    monkeypatch.setattr(progress.PlainProgress, "min_gap", 0.0)
    log = io.StringIO()
    console = Console(file=log, force_terminal=False)
    with progress.progress_bar(console) as bar:
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
