import os
import tempfile

# Offline and quiet before anything imports dspy, mlflow or datasets.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# DSPy reads its cache directory at import: a fresh one per session keeps the tests from
# answering out of a developer's (or an earlier CI run's) cache.
os.environ["DSPY_CACHEDIR"] = tempfile.mkdtemp(prefix="persona-agent-tests-dspy-cache-")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import dspy  # noqa: E402
import pytest  # noqa: E402

from persona_agent.adapters.fakes import FakeEngine  # noqa: E402

from .helpers import throwaway_memory  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh_memory_cache():
    """Each test starts without another test's cached LM answers in memory."""
    dspy.cache.reset_memory_cache()


@pytest.fixture(params=["edge", "client"])
def memory(request):
    """Every memory test runs on both point stores: Qdrant Edge and the server path."""
    m = throwaway_memory(request.param)
    m.kind = request.param
    yield m
    m.close()


@pytest.fixture
def fake_lm():
    """A deterministic LM: `fake_lm.engine.policy` decides each answer from the prompt."""
    engine = FakeEngine()
    lm = dspy.LM("fake/policy", engine=engine, cache=False, num_retries=0)
    with dspy.context(lm=lm, adapter=dspy.JSONAdapter()):
        yield lm


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch):
    """A fresh MLflow sqlite store for one test."""
    from persona_agent.adapters import tracking
    from persona_agent.settings import Settings

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    settings = Settings(store=tmp_path / "mlruns")
    tracking.setup(settings)
    return settings


@pytest.fixture(scope="session")
def fake_llm_server():
    """`bench/fake_llm_server.py`: the endpoint the tests and the benches fail on purpose."""
    from bench import fake_llm_server

    return fake_llm_server
