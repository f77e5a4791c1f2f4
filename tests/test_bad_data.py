"""A corpus of bad inputs. Each one holds a good record and a bad one: strict loading names the
file and the bad record and writes nothing; `--skip-bad` loads the good record and counts the
bad one. Whole-file problems (not JSON, not UTF-8, not a list) always stop."""

import json

import pytest

from persona_agent.adapters.points import open_memory
from persona_agent.cli import main
from persona_agent.data.loaders import MAX_FIELD_CHARS, load_users
from persona_agent.data.tasks import LAMP_2M, TaskDataError
from persona_agent.pipelines.ingest import ingest
from persona_agent.pipelines.memory import MemoryItem

LABELS = ", ".join(LAMP_2M.labels)


def q(text, labels=LABELS):
    return f"Which tag does this movie relate to among the following tags? tags: [{labels}] description: {text}"


def item(id_="p1", text="A heist film.", tag="action"):
    return {"id": id_, "description": text, "tag": tag}


GOOD = {"id": "q1", "user_id": "good", "input": q("A bank job."), "profile": [item()]}
GOOD_EVENT = {"user_id": "good", "input": q("A bank job."), "response": "action", "timestamp": "2025-01-01"}
HUGE = "x" * (MAX_FIELD_CHARS + 1)


def bad_lamp(record):
    return [GOOD, {"id": "q2", "user_id": "bad", "input": q("A space film."), "profile": [item("p2")], **record}]


# name -> (file name, content, where the error points, what it says); file-level ones skip nothing
RECORDS = {
    "missing field": ("q.json", [GOOD, {"id": "q2", "profile": []}], "record 1", "needs 'id', 'input' and 'profile'"),
    "profile not a list": ("q.json", bad_lamp({"profile": "p1,p2"}), "record 1", "'profile' must be a list"),
    "input not text": ("q.json", bad_lamp({"input": {"text": "x"}}), "record 1", "'input' must be text"),
    "item field mistyped": ("q.json", bad_lamp({"profile": [{"id": "p2", "description": ["a"], "tag": "action"}]}),
                            r"record 1 \(id q2\): profile\[0\]", "must be text"),
    "item lacks field": ("q.json", bad_lamp({"profile": [{"id": "p2", "tag": "action"}]}),
                         r"profile\[0\] \(id p2\)", "lacks field 'description'"),
    "unknown label in history": ("q.json", bad_lamp({"profile": [item("p2", tag="western")]}), "record 1",
                                 "not a LaMP-2M label"),
    "unknown label in the question": ("q.json", bad_lamp({"input": q("A film.", LABELS + ", western")}), "",
                                      "western"),
    "empty history": ("q.json", bad_lamp({"profile": []}), "record 1", "empty history"),
    "duplicate question id": ("q.json", bad_lamp({"id": "q1"}), "record 1", "duplicate question id"),
    "duplicate item id, other content": ("q.json", [GOOD, {**GOOD, "id": "q2", "profile": [item(text="Other.")]}],
                                         "record 1", "duplicate id with different content"),
    "huge text": ("q.json", bad_lamp({"profile": [item("p2", text=HUGE)]}), "record 1", "limit"),
    "OPPU duplicate user": ("oppu.json", [{"user_id": "a", "profile": [item()], "query": []}] * 2, "user 1",
                            "duplicate user id"),
    "OPPU query without input": ("oppu.json", [{"user_id": "a", "profile": [item()], "query": []},
                                               {"user_id": "b", "profile": [item()], "query": [{"id": "x"}]}],
                                 r"user 1 \(b\): query\[0\]", "needs 'id' and 'input'"),
    "event invalid JSON": ("e.jsonl", [GOOD_EVENT, '{"user_id": "bad", '], ":2", "invalid JSON"),
    "event wrong encoding": ("e.jsonl", [GOOD_EVENT, {**GOOD_EVENT, "input": q("Amélie.")}, "latin-1"], ":2",
                             "not UTF-8"),
    "event lacks response": ("e.jsonl", [GOOD_EVENT, {"user_id": "bad", "input": q("x")}], ":2", "lacks"),
    "event unknown label": ("e.jsonl", [GOOD_EVENT, {**GOOD_EVENT, "response": "western"}], ":2", "not a LaMP-2M label"),
    "event huge input": ("e.jsonl", [GOOD_EVENT, {**GOOD_EVENT, "input": q(HUGE)}], ":2", "limit"),
    "event user id not text": ("e.jsonl", [GOOD_EVENT, {**GOOD_EVENT, "user_id": ["a"]}], ":2", "must be a string"),
    "event empty user id": ("e.jsonl", [GOOD_EVENT, {**GOOD_EVENT, "user_id": " "}], ":2", "empty"),
    # ids a person could not name to `forget`, or that display as another user's
    "event user id with NUL": ("e.jsonl", [GOOD_EVENT, {**GOOD_EVENT, "user_id": "bad\x00"}], ":2", "U\\+0000"),
    "event user id with a newline": ("e.jsonl", [GOOD_EVENT, {**GOOD_EVENT, "user_id": "bad\nu2"}], ":2", "U\\+000A"),
    "event user id with a bidi override": ("e.jsonl", [GOOD_EVENT, {**GOOD_EVENT, "user_id": "bad\u202e10u"}], ":2",
                                           "right-to-left override"),
    "event user id with a zero-width space": ("e.jsonl", [GOOD_EVENT, {**GOOD_EVENT, "user_id": "ba\u200bd"}], ":2",
                                              "printable text"),
    "event user id a number": ("e.jsonl", [GOOD_EVENT, {**GOOD_EVENT, "user_id": 7}], ":2", "must be a string"),
    "event undated among dated ones": ("e.jsonl", [GOOD_EVENT, {k: v for k, v in GOOD_EVENT.items() if k != "timestamp"}],
                                       ":2", "every event dated or none"),
    "LaMP user id with a control character": ("q.json", bad_lamp({"user_id": "bad\x1b[2J"}), "record 1",
                                              "U\\+001B"),
    "event duplicate id": ("e.jsonl", [{**GOOD_EVENT, "id": "e1"}, {**GOOD_EVENT, "id": "e1", "response": "comedy"}],
                           ":2", "duplicate event id"),
}
FILES = {
    "not JSON": ("q.json", b'[{"id": "q1",', "cannot read JSON"),
    "not UTF-8": ("q.json", json.dumps([{**GOOD, "input": q("Amélie.")}], ensure_ascii=False).encode("latin-1"),
                  "not UTF-8"),
    "not a list": ("q.json", b'{"id": "q1"}', "expected a JSON list"),
}


def _write(tmp_path, name, content):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif name.endswith(".jsonl"):
        lines = [r if isinstance(r, str) else json.dumps(r, ensure_ascii=False) for r in content if r != "latin-1"]
        encoding = "latin-1" if "latin-1" in content else "utf-8"
        path.write_bytes(b"".join((line + "\n").encode("utf-8" if i == 0 else encoding) for i, line in enumerate(lines)))
    else:
        path.write_text(json.dumps(content))
    return path


@pytest.fixture
def memory(tmp_path):
    m = open_memory(path=str(tmp_path / "qdrant"))
    m.add("someone", [MemoryItem("old", "An old film.", "comedy")])
    yield m
    m.close()


def _snapshot(memory):
    return {u: sorted(it.item_id for it in memory.items(u)) for u in memory.user_ids()}


@pytest.mark.parametrize("case", sorted(RECORDS))
def test_a_bad_record_is_named_and_nothing_is_written(tmp_path, memory, case):
    name, content, where, says = RECORDS[case]
    path = _write(tmp_path, name, content)
    before = _snapshot(memory)
    with pytest.raises(TaskDataError, match=f"{path.name}.*{where}.*({says})"):
        ingest(memory, path, LAMP_2M)
    assert _snapshot(memory) == before


@pytest.mark.parametrize("case", sorted(RECORDS))
def test_skip_bad_loads_the_good_records_and_counts_the_bad(tmp_path, memory, case):
    name, content, _, says = RECORDS[case]
    path = _write(tmp_path, name, content)
    skipped = []
    report = ingest(memory, path, LAMP_2M, on_bad=skipped.append)
    assert len(skipped) == 1
    assert skipped[0].args[0].startswith(str(path))
    assert report.added >= 1
    assert "bad" not in memory.user_ids()


@pytest.mark.parametrize("case", sorted(FILES))
def test_a_bad_file_stops_even_with_skip_bad(tmp_path, memory, case):
    name, content, says = FILES[case]
    path = _write(tmp_path, name, content)
    for on_bad in (None, [].append):
        with pytest.raises(TaskDataError, match=f"{path.name}.*{says}"):
            ingest(memory, path, LAMP_2M, on_bad=on_bad)


def _lamp_dir(tmp_path, questions, golds):
    (tmp_path / "dev_questions.json").write_text(json.dumps(questions))
    (tmp_path / "dev_outputs.json").write_text(json.dumps({"task": "LaMP_2", "golds": golds}))
    return tmp_path


Q1, Q2 = {"id": "q1", "output": "action"}, {"id": "q2", "output": "comedy"}


@pytest.mark.parametrize("golds,says,skips", [
    ([Q1, Q2, {"id": "q9", "output": "comedy"}], "q9", 1),  # an output without a question
    ([Q1, {**Q2, "output": "western"}], "not a LaMP-2M label", 2),  # the gold, then its question
    ([Q1], "no gold", 1),  # a question without an output
    ([Q1, {**Q1, "output": "comedy"}, Q2], "duplicate", 1),
])
def test_bad_golds(tmp_path, golds, says, skips):
    data = _lamp_dir(tmp_path, bad_lamp({}), golds)
    with pytest.raises(TaskDataError, match=f"dev_(questions|outputs).json.*{says}"):
        load_users(data, LAMP_2M)
    skipped = []
    users = load_users(data, LAMP_2M, on_bad=skipped.append)
    assert len(skipped) == skips
    assert users[0].user_id == "good"
    assert users[0].queries[0].gold == "action"


def test_the_cli_reports_skips_and_fails_clearly(tmp_path, capsys):
    path = _write(tmp_path, "e.jsonl", RECORDS["event unknown label"][1])
    store = ["--store", str(tmp_path / "mlruns")]
    assert main(["ingest", str(path), *store]) == 2
    assert "e.jsonl:2" in capsys.readouterr().err
    assert main(["ingest", str(path), "--skip-bad", *store]) == 0
    out, err = capsys.readouterr()
    assert "1 new" in out
    assert "1 bad records skipped" in out
    assert "e.jsonl:2" in err


# -- odd input at the command line: one line naming the path, exit 2, nothing stored ---------------


def _ingest(tmp_path, path, *extra):
    return main(["ingest", str(path), "--store", str(tmp_path / "mlruns"), *extra])


@pytest.mark.parametrize("field", ["user_id", "input"])
def test_an_escaped_surrogate_is_a_named_bad_record_before_anything_is_written(tmp_path, field, capsys):
    good = {"user_id": "u1", "input": LAMP_2M.make_input("A heist.", LAMP_2M.labels), "response": "action"}
    bad = {**good, "id": "2", field: good[field] + "\ud800"}
    path = tmp_path / "events.jsonl"
    path.write_text(json.dumps({**good, "id": "1"}) + "\n" + json.dumps(bad) + "\n")  # json.dumps escapes it
    assert _ingest(tmp_path, path) == 2
    err = capsys.readouterr().err
    assert f"{path}:2" in err
    assert "not valid Unicode" in err
    assert not (tmp_path / "mlruns").exists()
    assert _ingest(tmp_path, path, "--skip-bad") == 0
    assert "1 new" in capsys.readouterr().out


def test_unix_seconds_may_carry_a_fraction(tmp_path, memory):
    path = tmp_path / "e.jsonl"
    path.write_text("".join(json.dumps({**GOOD_EVENT, "input": q(f"Film {i}."), "timestamp": t}) + "\n"
                            for i, t in enumerate([1700000000, 1700000100.25, 1700000050.5])))
    assert ingest(memory, path, LAMP_2M).added == 3
    assert [it.text for it in memory.items("good")] == ["Film 0.", "Film 2.", "Film 1."]  # by time, not by line


def test_an_unprintable_user_id_is_refused_naming_the_line_and_never_printed_raw(tmp_path, capsys):
    path = tmp_path / "events.jsonl"
    path.write_text(json.dumps(GOOD_EVENT) + "\n" + json.dumps({**GOOD_EVENT, "user_id": "u\u202e1000"}) + "\n")
    assert _ingest(tmp_path, path) == 2
    err = capsys.readouterr().err
    assert f"{path}:2" in err
    assert "u\\u202e1000" in err
    assert "\u202e" not in err
    assert not (tmp_path / "mlruns").exists()


@pytest.mark.parametrize("make", ["missing", "directory", "nested"])
def test_a_bad_input_path_is_one_line_and_creates_no_store(tmp_path, make, capsys):
    path = tmp_path / "x.jsonl"
    if make == "directory":
        path.mkdir()
    elif make == "nested":
        path = tmp_path / "deep.json"
        path.write_text("[" * 100_000 + "]" * 100_000)
    assert _ingest(tmp_path, path) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert str(path) in err
    assert "Traceback" not in err
    assert not (tmp_path / "mlruns").exists()


def test_a_store_that_is_a_file_is_one_line(tmp_path, capsys):
    store = tmp_path / "not-a-dir"
    store.write_text("x")
    assert main(["personas", "list", "--store", str(store)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert str(store) in err


def test_a_corrected_event_replaces_the_stale_one_and_is_counted(tmp_path, capsys):
    from persona_agent.nightly.jobs import fingerprint
    from persona_agent.settings import Settings

    query = LAMP_2M.make_input("A heist.", LAMP_2M.labels)
    first, second = tmp_path / "day1.jsonl", tmp_path / "day2.jsonl"
    first.write_text(json.dumps({"user_id": "u1", "id": "e1", "input": query, "response": "action"}) + "\n"
                     + json.dumps({"user_id": "u1", "id": "e2", "input": query + " Again.", "response": "comedy"}))
    second.write_text(json.dumps({"user_id": "u1", "id": "e1", "input": query, "response": "comedy"}))
    assert _ingest(tmp_path, first) == 0
    memory = open_memory(path=str(Settings(store=tmp_path / "mlruns").qdrant_path))
    before = fingerprint(memory.items("u1"))
    memory.close()
    capsys.readouterr()
    assert _ingest(tmp_path, second) == 0
    assert "0 new, 1 updated, 0 already in memory" in capsys.readouterr().out
    memory = open_memory(path=str(Settings(store=tmp_path / "mlruns").qdrant_path))
    try:
        items = memory.items("u1")
        assert [(it.item_id, it.response) for it in items] == [("e1", "comedy"), ("e2", "comedy")]  # same place
        assert fingerprint(items) != before  # so nightly re-aligns the user on the corrected history
    finally:
        memory.close()


def test_a_store_path_with_url_characters_works_and_writes_nothing_outside(tmp_path, monkeypatch, capsys):
    from persona_agent.data.synthetic import write_dataset

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # where the store's plain-named alias goes
    monkeypatch.chdir(tmp_path)
    data = write_dataset(tmp_path / "data", LAMP_2M, n_users=2, n_history=4, n_queries=1, seed=3)
    store = tmp_path / "we?ird%41 #x&y=1" / "mlruns"
    opts = ["--store", str(store), "--lm", "scripted"]
    query = LAMP_2M.make_input("A heist.", LAMP_2M.labels)
    assert main(["ingest", str(data), "--store", str(store)]) == 0
    assert main(["nightly", *opts, "-n", "1", "-T", "1"]) == 0
    assert main(["personas", "list", "--store", str(store)]) == 0
    assert main(["answer", "u0001", query, *opts]) == 0
    assert "Traceback" not in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["cache", "data", "we?ird%41 #x&y=1"])
    assert (store / "mlflow.db").stat().st_size > 0
    assert list((store / "artifacts").rglob("users.csv"))
    assert [p.name for p in (tmp_path / "we?ird%41 #x&y=1").iterdir()] == ["mlruns"]


def _immutable(path, on: bool) -> bool:
    import subprocess

    try:
        return subprocess.run(["chattr", "-R", "+i" if on else "-i", str(path)], capture_output=True).returncode == 0
    except OSError:
        return False


def test_a_read_only_store_is_one_line_naming_the_path(tmp_path, monkeypatch, capsys):
    from persona_agent.data.synthetic import write_dataset

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    data = write_dataset(tmp_path / "data", LAMP_2M, n_users=2, n_history=4, n_queries=1, seed=3)
    store = tmp_path / "mlruns"
    assert main(["ingest", str(data), "--store", str(store)]) == 0
    assert main(["nightly", "--store", str(store), "--lm", "scripted", "-n", "1", "-T", "1"]) == 0
    # read-only even for root (tests often run as root, where permission bits do not bind)
    if not _immutable(store, True):
        pytest.skip("chattr +i is not available here")
    try:
        capsys.readouterr()
        query = LAMP_2M.make_input("A heist.", LAMP_2M.labels)
        for argv in (["ingest", str(data)], ["nightly", "--lm", "scripted"], ["answer", "u0001", query, "--lm", "scripted"]):
            assert main([*argv, "--store", str(store)]) == 2, argv
            err = capsys.readouterr().err.strip()
            assert len(err.splitlines()) == 1 and str(store) in err and "Traceback" not in err, err
    finally:
        _immutable(store, False)
