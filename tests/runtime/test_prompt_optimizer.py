"""PersonaAlignment through `mlflow.genai.optimize_prompts`: the docs' example as printed, and the
guard: a rejected rewrite registers nothing; an LM error stops it instead of being scored."""

import os
import re
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

from persona_agent.adapters.prompt_optimizer import PersonaPromptOptimizer, PredictFailed, train_data
from persona_agent.adapters.scorers import task_scorer
from persona_agent.data.tasks import LAMP_2M
from persona_agent.optimizers import PersonaAlignment
from persona_agent.optimizers.acceptance import AcceptValid, Outcome
from persona_agent.pipelines.persona import Persona

DOCS = Path(__file__).parents[2] / "docs" / "mlflow.md"


def example() -> str:
    text = DOCS.read_text()
    section = text[text.index("## Aligning through MLflow's optimizer API"):]
    return re.search(r"```python\n(.*?)```", section, flags=re.S).group(1)


def _run(code: str, cwd: Path) -> subprocess.CompletedProcess:
    """In a fresh folder, as a user pastes it: no MLflow settings, and a DSPy cache of its own."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")} | {"DSPY_CACHEDIR": str(cwd / "dspy-cache")}
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, env=env, timeout=1800)


def _versions(name: str) -> list[int]:
    return sorted(int(v.version) for v in mlflow.MlflowClient().search_prompt_versions(name))


def test_the_docs_example_runs_with_the_scripted_lm(tmp_path):
    code = example()
    assert "settings = Settings()" in code
    out = _run(code.replace("settings = Settings()", "settings = Settings(lm=LMConfig(model='scripted'))").replace(
        "from persona_agent.settings import Settings", "from persona_agent.settings import LMConfig, Settings"), tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    # The scripted LM answers the same label whatever the persona: every rewrite ties, and a tie keeps it.
    line = out.stdout.splitlines()[-2]
    assert line.startswith("score ") and line.endswith("no new version"), out.stdout
    run_id = out.stdout.split("run: ")[1].split()[0]
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    run = mlflow.get_run(run_id)
    assert run.data.params["optimizer"] == "PersonaPromptOptimizer"
    assert {"initial_eval_score", "final_eval_score", "batch_score", "initial_eval_score.lamp2m_score"} <= set(
        run.data.metrics), run.data.metrics
    [prompt] = mlflow.genai.search_prompts()
    assert _versions(prompt.name) == [1]  # the one the example registered; none from the optimizer


@pytest.mark.slow
@pytest.mark.integration
def test_the_docs_example_runs_as_printed_with_the_local_model(tmp_path):
    out = _run(example(), tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert re.search(r"^score \d\.\d{3} -> \d\.\d{3}; (new version \d+|no new version)$", out.stdout, flags=re.M), out.stdout


def _predict_fn(prompt, answers):
    """The user's app: answers by the persona's first named tag (the profile decides)."""

    def predict_fn(query: str, item_id: str = "", hidden=None) -> str:
        persona = Persona.parse(LAMP_2M, prompt.format())
        answers.append(persona.profile)
        named = [label for label in LAMP_2M.labels if label in persona.profile]
        return named[0] if named else "comedy"

    return predict_fn


class _Never:
    needs_scores = True

    def __call__(self, trial):
        return Outcome.TIED


def _optimize(mlflow_store, fake_lm, acceptance, predict=None):
    prompt = mlflow.genai.register_prompt(name="persona.lamp2m.u1", template=Persona(LAMP_2M, "").render())
    records = [{"inputs": {"query": f"Which tag fits film {i}? tags: [action, comedy] description: a film.",
                           "item_id": f"h{i}", "hidden": []}, "outputs": "action"} for i in range(3)]
    optimizer = PersonaPromptOptimizer(LAMP_2M, PersonaAlignment(batch_size=3, iterations=1, acceptance=acceptance))
    seen = []
    result = mlflow.genai.optimize_prompts(predict_fn=predict or _predict_fn(prompt, seen), train_data=records,
                                           prompt_uris=[prompt.uri], optimizer=optimizer,
                                           scorers=[task_scorer(LAMP_2M)])
    return prompt, optimizer, result, seen


def test_an_accepted_rewrite_is_the_new_version(mlflow_store, fake_lm):
    prompt, optimizer, result, seen = _optimize(mlflow_store, fake_lm, AcceptValid())
    [step] = optimizer.steps
    assert step.accepted and step.wrote_candidate, step.reason
    assert _versions(prompt.name) == [1, 2]
    assert Persona.parse(LAMP_2M, result.optimized_prompts[0].template).profile == step.profile_after
    assert step.profile_after in seen  # the candidate was run through MLflow's eval_fn, not beside it
    assert result.initial_eval_score == step.batch_score


def test_a_rejected_rewrite_registers_no_version(mlflow_store, fake_lm):
    prompt, optimizer, result, _ = _optimize(mlflow_store, fake_lm, _Never())
    [step] = optimizer.steps
    assert step.outcome is Outcome.TIED and step.candidate_score is not None, step.reason
    assert result.optimized_prompts == []
    assert _versions(prompt.name) == [1]
    assert result.final_eval_score == result.initial_eval_score


def test_an_lm_error_in_predict_fn_stops_it_and_registers_nothing(mlflow_store, fake_lm):
    calls = []

    def failing(query: str, item_id: str = "", hidden=None) -> str:  # MLflow's own first check passes: then an outage
        calls.append(query)
        if len(calls) > 1:
            raise ConnectionError("the LM endpoint is down")
        return "action"

    with pytest.raises(PredictFailed, match="the LM endpoint is down"):
        _optimize(mlflow_store, fake_lm, AcceptValid(), predict=failing)
    assert _versions("persona.lamp2m.u1") == [1]


def test_train_data_keeps_what_replay_must_hide():
    import dspy

    [record] = train_data([dspy.Example(query="q", answer="comedy", item_id="h1", hidden=("h0",))])
    assert record == {"inputs": {"query": "q", "item_id": "h1", "hidden": ["h0"]}, "outputs": "comedy"}


def test_an_aggregate_past_one_is_refused_rather_than_read_as_a_perfect_batch(mlflow_store, fake_lm):
    from mlflow.genai.scorers import scorer

    @scorer(name="always")
    def always(outputs) -> float:
        return 1.0

    prompt = mlflow.genai.register_prompt(name="persona.lamp2m.u2", template=Persona(LAMP_2M, "").render())
    records = [{"inputs": {"query": f"Which tag fits film {i}? tags: [action, comedy]"}, "outputs": "comedy"}
               for i in range(2)]
    with pytest.raises(ValueError, match="outside \\[0, 1\\]"):
        mlflow.genai.optimize_prompts(predict_fn=_predict_fn(prompt, []), train_data=records, prompt_uris=[prompt.uri],
                                      optimizer=PersonaPromptOptimizer(LAMP_2M, PersonaAlignment(batch_size=2, iterations=1)),
                                      scorers=[task_scorer(LAMP_2M), always],
                                      aggregation=lambda scores: sum(scores.values()))
    assert _versions(prompt.name) == [1]
