"""An API key given through the environment reaches the LLM endpoint and nothing else: not
MLflow params, tags, prompts, traces or artifacts, not the DSPy cache, not logs or output."""

import logging
import os
import secrets
from pathlib import Path

import mlflow
import pytest

from persona_agent.adapters import tracking
from persona_agent.cli import main
from persona_agent.data.synthetic import write_dataset
from persona_agent.data.tasks import LAMP_2M

from ..helpers import files_holding


@pytest.mark.slow
def test_the_api_key_never_reaches_the_store_logs_or_output(tmp_path, monkeypatch, caplog, capsys, fake_llm_server):
    key = "sk-test-" + secrets.token_hex(16)
    monkeypatch.setenv("OPENAI_API_KEY", key)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    server, url = fake_llm_server.serve_in_background(latency=0.0)
    seen_keys = []
    handler = server.handler
    original = handler.do_POST

    def recording(self):
        seen_keys.append(self.headers.get("Authorization", ""))
        return original(self)

    handler.do_POST = recording
    # data no other test has: every LM call misses the cache, reaches the server, and is cached
    data = write_dataset(tmp_path / "data", LAMP_2M, n_users=2, n_history=8, n_queries=1, seed=int(key[-6:], 16))
    lm = ["--lm", "openai/gpt-4o-mini", "--api-base", url, "--store", str(tmp_path / "mlruns")]
    caplog.set_level(logging.DEBUG)
    try:
        assert main(["ingest", str(data), "--store", str(tmp_path / "mlruns")]) == 0  # ingest calls no LLM
        assert main(["nightly", "--iterations", "1", "--batch", "2", "--trace", *lm]) == 0
        assert main(["eval", "--data", str(data), "--methods", "persona-agent,rag", "--iterations", "1",
                     "--batch", "2", "--trace", "--out", str(tmp_path / "mlruns" / "eval"), *lm]) == 0
        assert main(["answer", "u0000", LAMP_2M.make_input("A heist film.", LAMP_2M.labels), "--trace", *lm]) == 0
    finally:
        server.shutdown()
        tracking.disable_traces()  # --trace turned tracing on for this process: off for the tests after
    assert seen_keys
    assert all(k == f"Bearer {key}" for k in seen_keys)  # the endpoint got it: the test is live
    out, err = capsys.readouterr()
    assert key not in out + err
    assert key not in caplog.text
    roots = (tmp_path / "mlruns", Path(os.environ["DSPY_CACHEDIR"]))
    files = [p for root in roots for p in root.rglob("*") if p.is_file()]
    assert any(p.name == "mlflow.db" for p in files)
    assert len(files) > 10
    assert [p for root in roots for p in files_holding(root, key.encode())] == []  # read in another process
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    runs = mlflow.search_runs(search_all_experiments=True)
    assert len(runs) > 0
    assert not runs.astype(str).apply(lambda col: col.str.contains(key)).any().any()
    traces = mlflow.search_traces(locations=[e.experiment_id for e in mlflow.search_experiments()])
    assert len(traces) > 0  # traces were recorded, and were scanned above with the database
