"""Integration: the shipped model behind llama.cpp's OpenAI-compatible server works like in process.

One user's demo runs twice from the command line, once through `--lm openai/... --api-base` against
`bench/llama_server.py` (xllamacpp on a free 127.0.0.1 port, the same weights) and once with the
in-process engine; the served run must parse and must not be much slower.
"""

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory):
    port = _free_port()
    # Every process gets a DSPy cache of its own: two processes that open one fresh cache folder at
    # once left its SQLite shards corrupt here ("database disk image is malformed" in a later test).
    env = {**os.environ, "DSPY_CACHEDIR": str(tmp_path_factory.mktemp("llama-server-cache"))}
    proc = subprocess.Popen([sys.executable, str(ROOT / "bench" / "llama_server.py"), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + 120
    while True:
        try:
            urllib.request.urlopen(f"{url}/models", timeout=2).read()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"llama.cpp server did not start: {proc.stdout.read()[-2000:]}")
            time.sleep(0.5)
    yield url
    proc.terminate()
    proc.wait(timeout=30)


def _demo(store: Path, *lm_args: str) -> tuple[float, dict]:
    env = {**os.environ, "OPENAI_API_KEY": "unused", "MLFLOW_TRACKING_URI": f"sqlite:///{store / 'mlflow.db'}",
           "DSPY_CACHEDIR": str(store.parent / f"{store.name}-cache")}
    started = time.perf_counter()
    done = subprocess.run(["persona-agent", "demo", "--users", "1", "--no-cache", "--store", str(store), *lm_args],
                          env=env, capture_output=True, text=True, timeout=900)
    wall = time.perf_counter() - started
    assert done.returncode == 0, done.stderr[-3000:]
    client = mlflow.MlflowClient(f"sqlite:///{store / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("persona-agent").experiment_id],
                                "tags.command = 'demo'")
    return wall, run.data.metrics


def test_the_demo_through_an_openai_compatible_server_parses_like_the_in_process_engine(llama_server, tmp_path):
    served_wall, served = _demo(tmp_path / "served", "--lm", "openai/gemma3-270m", "--api-base", llama_server)
    local_wall, local = _demo(tmp_path / "local")
    print(f"served: {served_wall:.0f} s, parse rate {served['parse_rate']:.2f}; "
          f"in process: {local_wall:.0f} s, parse rate {local['parse_rate']:.2f}")
    assert served["parse_rate"] >= 0.9
    assert served["answers"] == 9  # how long each took is printed, not asserted


def test_the_server_passes_the_scoring_probe_and_scores_labels(llama_server):
    """llama.cpp's server gives top log-probabilities and continues a trailing assistant message:
    the evidence answer step runs through it (not the prompting fallback)."""
    import math

    from persona_agent import overrides
    from persona_agent.adapters.llm import adapter_for, build_lm
    from persona_agent.data.tasks import LAMP_2M
    from persona_agent.pipelines import evidence
    from persona_agent.settings import LMConfig

    lm = build_lm(LMConfig(model="openai/gemma3-270m", api_base=llama_server, cache=False))
    assert evidence.scoring_unsupported(lm, adapter_for(lm)) is None, overrides.engine_of(lm).probe_result
    text, prefix = LAMP_2M.reading(LAMP_2M.make_input("A movie that is fantasy, romance, violence.", LAMP_2M.labels))
    support = evidence.label_logprobs(lm, [{"role": "user", "content": text}], prefix, labels=LAMP_2M.labels,
                                      expand="all", missing=-math.inf, lead=" ")
    assert max(support, key=support.get) in {"fantasy", "romance", "violence"}
