"""`persona-agent forget USER`: after it, no byte of the store or the LM cache holds what the
user wrote, the served model answers null for them, the others are untouched, and it is
idempotent."""

import json
import os
from pathlib import Path

import pytest

from persona_agent.adapters import tracking
from persona_agent.adapters.fakes import FakeEngine, default_policy
from persona_agent.adapters.points import EdgePoints
from persona_agent.adapters.registry import PersonaRegistry
from persona_agent.cli import main
from persona_agent.data.synthetic import write_dataset
from persona_agent.data.tasks import LAMP_2M
from persona_agent.pipelines.memory import EpisodicMemory
from persona_agent.settings import Settings

from ..helpers import files_holding

MARKER = "Zqxmarker"  # a word, so that the scripted LM copies it into profiles and critiques as well
QUERY = LAMP_2M.make_input("A film about a heist.", LAMP_2M.labels)


def _plant(data: Path, user: str) -> None:
    """The marker in every text the user wrote: their history and their query."""
    path = data / "dev_questions.json"
    records = json.loads(path.read_text())
    for record in records:
        if record["user_id"] == user:
            record["input"] = record["input"].replace("description: ", f"description: {MARKER} ")
            for item in record["profile"]:
                for key, value in item.items():
                    if key not in ("id", "date", "tag", "score") and isinstance(value, str):
                        item[key] = f"{value} {MARKER}"
    path.write_text(json.dumps(records))


def _holding(root: Path, needle: bytes) -> list[Path]:
    return files_holding(root, needle)


def _echoing(fields, system, user):
    """The scripted LM, but its free text repeats the marker when the prompt holds it, as a real
    LLM's profile and critique quote a user: so it reaches the registry, traces, outputs and cache."""
    out = default_policy(fields, system, user)
    return {f: f"{v} {MARKER}" if MARKER in user and isinstance(v, str) and f not in ("answer", "next_thought",
                                                                                     "next_tool_name") else v
            for f, v in out.items()}


@pytest.mark.slow  # ingest, nightly, eval, log-model and answer on one store: about a minute
def test_forget_leaves_no_byte_of_the_user(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr(FakeEngine.__init__, "__defaults__", (_echoing, 0.0))  # what `--lm scripted` builds
    store, data = tmp_path / "store", tmp_path / "data"
    write_dataset(data, LAMP_2M, n_users=3, n_history=4, n_queries=1, seed=5)
    _plant(data, "u0001")
    common = ["--store", str(store)]
    lm = ["--lm", "scripted", *common]
    try:
        assert main(["ingest", str(data), *common]) == 0
        assert main(["nightly", "-n", "2", "-T", "1", "--trace", *lm]) == 0
        assert main(["eval", "--data", str(data), "--methods", "non-personalized,persona-agent", "-T", "1",
                     "--trace", *lm]) == 0
        assert main(["log-model", *common]) == 0
        assert main(["answer", "u0001", QUERY, "--trace", *lm]) == 0
    finally:
        tracking.disable_traces()
    cache = Path(os.environ["DSPY_CACHEDIR"])
    before = _holding(store, MARKER.encode()) + _holding(cache, MARKER.encode())
    kinds = {p.relative_to(store).parts[0] for p in before if p.is_relative_to(store)}
    assert {"qdrant-edge", "mlflow.db", "artifacts", "state.db"} <= kinds, kinds  # the test plants where forgetting must reach
    assert any(p.is_relative_to(cache) for p in before)
    named = {p.relative_to(store).parts[0] for p in _holding(store, b"u0001")}
    assert {"qdrant-edge", "mlflow.db", "eval", "artifacts", "state.db"} <= named, named
    others = EdgePoints(store / "qdrant-edge")
    count_before = {u: others.count(u) for u in ("u0000", "u0002")}
    others.close()
    capsys.readouterr()

    assert main(["forget", "u0001", *common]) == 0
    said = capsys.readouterr().out
    assert said.startswith("forgot u0001: ") and "memories" in said and "persona versions" in said, said
    assert _holding(store, MARKER.encode()) == []
    assert _holding(cache, MARKER.encode()) == []
    assert _holding(store, b"u0001") == []  # nor the id: rows, tags and the erasure record hold none
    memory = EpisodicMemory(EdgePoints(store / "qdrant-edge"))
    assert memory.user_ids() == ["u0000", "u0002"]
    assert {u: memory.count(u) for u in count_before} == count_before
    memory.close()
    assert PersonaRegistry(LAMP_2M, Settings(store=store).tracking_uri).production_version("u0000") is not None
    assert main(["answer", "u0000", QUERY, *lm]) == 0  # the others are served as before
    assert main(["answer", "u0001", QUERY, *lm]) == 2  # no persona: as for a user never seen
    record = [json.loads(line) for line in (store / "forgotten.jsonl").read_text().splitlines()]
    assert len(record) == 1
    assert record[0]["removed"]["memories"] == 4
    assert len(record[0]["user"]) == 32
    capsys.readouterr()
    assert main(["forget", "u0001", *common]) == 0  # again: nothing left, nothing changed, not even the record
    assert "nothing was changed" in capsys.readouterr().out
    assert len((store / "forgotten.jsonl").read_text().splitlines()) == 1


def test_drop_rows_reads_each_table_format(tmp_path):
    from persona_agent.operations.forget import _drop_rows

    files = {  # each: one row of u1's, one of u10's, and u1 as a value in a column that names no user
        "t.json": json.dumps({"columns": ["user_id", "gold"], "data": [["u1", "x"], ["u10", "u1"], ["u2", "y"]]}),
        "l.json": json.dumps({"golds": [{"id": "q1", "output": "u1", "user_id": "u2"}, {"id": "q2", "user_id": "u1"}]}),
        "c.csv": "user_id,status\nu1,aligned\nu10,u1\nu2,aligned\n",
        "demo.csv": "user,lm_calls\nu1,3\nu2,u1\nall,3\n",  # the demo's table: its index column is `user`
        "e.jsonl": json.dumps({"user_id": "u1"}) + "\n" + json.dumps({"user_id": "u2", "note": "u1"}) + "\n",
    }
    for name, text in files.items():
        (tmp_path / name).write_text(text)
        assert _drop_rows(tmp_path / name, "u1") == 1, name
        assert "u1" in (tmp_path / name).read_text(), name  # the value in another user's row stays
        assert _drop_rows(tmp_path / name, "u1") == 0  # idempotent
    assert json.loads((tmp_path / "t.json").read_text())["data"] == [["u10", "u1"], ["u2", "y"]]
    for name, text in {"counts.json": json.dumps({"u1": 3, "rejected": 1}), "notes.md": "| u1 | 0.5 |\n",
                       "requirements.txt": "u1\n"}.items():  # no user column: nothing is a user's row
        (tmp_path / name).write_text(text)
        assert _drop_rows(tmp_path / name, "u1") == 0 and (tmp_path / name).read_text() == text, name
