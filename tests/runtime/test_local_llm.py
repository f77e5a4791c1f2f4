"""Integration: the real local LLM, embedded Qdrant and a real MLflow store."""

from pathlib import Path
from typing import Literal

import dspy
import mlflow
import pytest
from rich.console import Console

from persona_agent.adapters.llm import adapter_for, build_lm
from persona_agent.adapters.registry import PersonaRegistry, prompt_name
from persona_agent.data.tasks import LAMP_2M
from persona_agent.demo import run_demo
from persona_agent.overrides import engine_of
from persona_agent.pipelines.persona import profile_problem
from persona_agent.runtime.store import Store
from persona_agent.settings import LMConfig, Settings

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def local_lm():
    return build_lm(LMConfig(cache=False))


def test_local_model_answers_parse_under_the_label_schema(local_lm):
    class Tag(dspy.Signature):
        """Tag the movie."""

        description: str = dspy.InputField()
        answer: Literal["comedy", "action", "romance"] = dspy.OutputField()

    with dspy.context(lm=local_lm, adapter=adapter_for(local_lm)):
        answers = [dspy.Predict(Tag)(description=d).answer
                   for d in ("two strangers fall in love", "a rooftop shootout", "a wedding gone wrong")]
    assert all(a in ("comedy", "action", "romance") for a in answers)
    assert all(h["usage"]["completion_tokens"] < 30 for h in local_lm.history)  # compact JSON, no padding


def _tcp_listeners() -> set[str]:
    rows = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows += open(table).read().splitlines()[1:]
        except OSError:
            pass
    return {r.split()[1] for r in rows if r.split()[3] == "0A"}  # local addresses in LISTEN state


def test_the_local_runtime_opens_no_tcp_port(local_lm):
    before = _tcp_listeners()
    engine = engine_of(local_lm)
    server = engine._load()
    assert server.listening_address.startswith("unix://")
    socket_dir = Path(engine._socket_dir.name)
    assert socket_dir.stat().st_mode & 0o077 == 0  # only this user can reach the socket
    assert _tcp_listeners() <= before


def test_demo_end_to_end_registers_every_persona_revision(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    settings = Settings(store=tmp_path / "mlruns", lm=LMConfig(cache=False), batch_size=1, iterations=1, max_iters=1)
    console = Console(record=True, width=200)
    with Store.open(settings, memory="persistent") as store:
        table = run_demo(settings, store, "lamp2m", users=1, queries=1, console=console)
    assert list(table.index) == ["u0000", "all"]
    production = PersonaRegistry(LAMP_2M).get("u0000").persona.profile
    printed = console.export_text()
    # the demo prints what serves: the production profile, and it is no junk
    assert f"u0000: {production}" in printed
    assert "alignment candidates:" in printed
    assert production == "(nothing known yet)" or profile_problem(production, task=LAMP_2M) is None
    assert table.loc["all", "answers"] == 3
    assert table.loc["all", "lm_calls"] > 0
    history = PersonaRegistry(LAMP_2M).history("u0000")
    assert list(history.version)[0] == 1
    assert history.production.sum() == 1
    assert (history.stage == "aligned").sum() <= 1  # T=1: at most one candidate (none if the batch was perfect)
    alias = mlflow.genai.load_prompt(f"prompts:/{prompt_name('lamp2m', 'u0000')}@production")
    assert "<profile>" in alias.template
    runs = mlflow.search_runs(experiment_names=["persona-agent"])
    assert len(runs) == 2
    assert "metrics.after_alignment_accuracy" in runs.columns
    assert (tmp_path / "mlruns" / "qdrant-edge").exists()
