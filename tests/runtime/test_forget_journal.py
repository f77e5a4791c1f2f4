"""An erase is a journal: `forget` that stops half way (an error, a kill) says what it removed and
what not, never "nothing was changed"; until `forget` runs again and finishes it, `answer` and
`nightly` refuse the user and `doctor` names the unfinished erase (never "restore a backup")."""

import json

import pytest

from persona_agent.adapters.registry import PersonaRegistry
from persona_agent.cli import main
from persona_agent.data.tasks import LAMP_2M
from persona_agent.operations import forget as forgetting
from persona_agent.runtime import erasures
from persona_agent.settings import Settings

QUERY = LAMP_2M.make_input("A film about a heist.", LAMP_2M.labels)


@pytest.fixture
def store(aligned_copy):
    return aligned_copy


def _err(capsys) -> str:
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return captured.out + captured.err


def _half_forgotten(store, capsys):
    """What the others see while u0000's erase is unfinished."""
    opts = ["--store", str(store)]
    assert main(["answer", "u0000", QUERY, "--lm", "scripted", *opts]) == 2
    assert "u0000 is being forgotten" in _err(capsys)
    assert main(["answer", "u0001", QUERY, "--lm", "scripted", *opts]) == 0  # the others are served
    capsys.readouterr()
    assert main(["doctor", *opts]) == 1
    out = _err(capsys)
    assert "unfinished" in out
    assert "persona-agent forget USER" in out
    assert "damaged" not in out
    assert "history shrank" not in out  # what the erase took is no damage


def test_an_erase_stopped_by_the_tracking_store_says_what_it_did_and_the_rerun_finishes_it(store, monkeypatch, capsys):
    from mlflow.exceptions import MlflowException

    opts = ["--store", str(store)]
    with monkeypatch.context() as mp:
        mp.setattr(PersonaRegistry, "delete", lambda self, user: (_ for _ in ()).throw(
            MlflowException("(sqlite3.OperationalError) attempt to write a readonly database")))
        assert main(["forget", "u0000", *opts]) == 2
    said = _err(capsys)
    assert "only in part" in said
    assert "nothing was changed" not in said
    assert "memories" in said.split("not removed yet")[0]
    assert "persona versions" in said.split("not removed yet")[1]
    _half_forgotten(store, capsys)
    events = store.parent / "more.jsonl"  # new interactions of theirs arrive meanwhile: not aligned on
    events.write_text("".join(json.dumps({"user_id": "u0000", "input": LAMP_2M.make_input(f"A new film {i}.", LAMP_2M.labels),
                                          "response": "action", "timestamp": f"2030-01-0{i + 1}"}) + "\n" for i in range(3)))
    assert main(["ingest", str(events), *opts]) == 0
    assert main(["nightly", "--lm", "scripted", "-n", "1", "-T", "1", *opts]) == 1
    assert "an erase of this user did not finish" in _err(capsys)
    assert main(["forget", "u0000", *opts]) == 0
    said = _err(capsys)
    assert "forgot u0000" in said
    assert not (store / erasures.JOURNAL).exists()
    record = json.loads((store / "forgotten.jsonl").read_text().splitlines()[-1])
    assert record["removed"]["memories"] == 4 + 3
    assert record["removed"]["persona versions"] >= 1  # both runs' counts
    assert main(["doctor", *opts]) == 0
    assert main(["forget", "u0000", *opts]) == 0
    assert "nothing was changed" in _err(capsys)


def test_an_erase_killed_between_memory_and_state_is_finished_not_restored(store, monkeypatch, capsys):
    """A kill leaves the journal as it was last written: the intent and the steps done."""
    with monkeypatch.context() as mp:
        mp.setattr(erasures.Journal, "stopped", lambda *args: None)  # a killed process writes nothing more
        mp.setattr(forgetting, "_forget_states", lambda *args: (_ for _ in ()).throw(KeyboardInterrupt))
        with pytest.raises(BaseException):
            forgetting.forget(Settings(store=store), "u0000")
    journal = json.loads((store / erasures.JOURNAL).read_text())
    assert [e["done"] for e in journal["erases"].values()] == [["memories"]]
    assert "u0000" not in (store / erasures.JOURNAL).read_text()  # a hash, never the id
    _half_forgotten(store, capsys)
    assert main(["forget", "u0000", "--store", str(store)]) == 0
    assert main(["doctor", "--store", str(store)]) == 0


def test_an_id_no_user_has_leaves_no_journal_and_no_salt(store):
    before = sorted(p.name for p in store.iterdir())
    assert not forgetting.forget(Settings(store=store), "nobody-at-all")
    assert sorted(p.name for p in store.iterdir()) == before


def test_an_unreadable_journal_is_damage_not_a_traceback(store, capsys):
    (store / erasures.JOURNAL).write_text("{not json")
    assert main(["answer", "u0000", QUERY, "--lm", "scripted", "--store", str(store)]) == 6
    assert "the erase journal cannot be read" in _err(capsys)
