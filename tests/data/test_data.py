import json
import re
from collections import Counter

import pytest

from persona_agent.data.loaders import load_users
from persona_agent.data.synthetic import SETS, generate, set_options, shipped_data_dir, write_dataset
from persona_agent.data.tasks import LAMP_2M, TASKS, TaskDataError
from persona_agent.pipelines.flow import examples
from persona_agent.pipelines.memory import history_items


@pytest.mark.parametrize("key", sorted(TASKS))
def test_shipped_data_loads_for_every_task(key):
    task = TASKS[key]
    users = load_users(shipped_data_dir(task), task)
    assert len(users) == 8
    for u in users:
        assert len(u.queries) == 6
        assert all(q.gold in task.labels for q in u.queries)
        assert u.rule is not None  # the planted rule, for the oracle row
        # LaMP-1 papers carry no decision: its interactions are built from the 39 papers after the first
        assert len(examples(task, history_items(task, u.history))) == (39 if key == "lamp1" else 40)


def test_generated_users_really_differ():
    """Same kind of items, different golds: each user has their own rule."""
    _, outputs, rules = generate(LAMP_2M, n_users=6, n_queries=20, seed=3)
    assert len({tuple(r["tag_priority"]) for r in rules.values()}) == 6
    by_user = {}
    for g in outputs["golds"]:
        by_user.setdefault(g["id"].split("-")[0], Counter())[g["output"]] += 1
    top = {u: c.most_common(1)[0][0] for u, c in by_user.items()}
    assert len(set(top.values())) > 1


@pytest.mark.parametrize("key", ["lamp2m", "lamp2n"])
def test_gold_is_one_of_several_cued_labels_so_a_generic_answer_is_near_chance(key):
    """The gold is the user's favourite among 2-3 cued labels; knowing only the item, the best
    user-independent guess (the globally most chosen cued label) is right well under 70%."""
    task = TASKS[key]
    users = load_users(write_dataset_tmp(task), task)
    hits = total = 0
    for u in users:
        for it in u.history:
            text = task.item_text(it).lower()
            cued = [lab for lab in task.labels if _cues(key, lab, text)]
            assert task.item_response(it) in cued
            assert len(cued) >= 2
            total += 1
            hits += task.item_response(it) == cued[0]
    assert hits / total < 0.7


def _cues(key, label, text):
    from persona_agent.data import synthetic

    cues = synthetic.CUES_2M if key == "lamp2m" else synthetic.CUES_2N
    return any(p.lower() in text for p in cues[label])


def write_dataset_tmp(task, _cache={}):
    import tempfile

    if task.key not in _cache:
        _cache[task.key] = write_dataset(tempfile.mkdtemp(), task, n_users=5, n_history=30, n_queries=2, seed=1)
    return _cache[task.key]


def test_rating_users_have_a_bias_their_history_shows():
    task = TASKS["lamp3"]
    _, _, rules = generate(task, n_users=8, seed=0)
    assert {r["rating_bias"] for r in rules.values()} - {0}


def test_oppu_format(tmp_path):
    path = tmp_path / "oppu.json"
    path.write_text(json.dumps([{"user_id": "a", "profile": [{"id": "1", "description": "x", "tag": "comedy"}],
                                 "query": [{"id": "q", "input": "description: y", "gold": "action"}]}]))
    (user,) = load_users(path, LAMP_2M)
    assert user.user_id == "a"
    assert user.queries[0].gold == "action"
    assert history_items(LAMP_2M, user.history)[0].response == "comedy"


def _lamp(tmp_path, questions, golds=None):
    (tmp_path / "dev_questions.json").write_text(json.dumps(questions))
    if golds is not None:
        (tmp_path / "dev_outputs.json").write_text(json.dumps({"task": "LaMP_2", "golds": golds}))
    return tmp_path


def test_lamp_without_outputs_has_no_golds(tmp_path):
    users = load_users(_lamp(tmp_path, [{"id": "7", "input": "description: y",
                                         "profile": [{"id": "p", "description": "d", "tag": "comedy"}]}]), LAMP_2M)
    assert users[0].user_id == "7"
    assert users[0].queries[0].gold is None


@pytest.mark.parametrize("questions,golds,message", [
    ([{"id": "1", "input": "x"}], None, r"record 0 needs 'id', 'input' and 'profile'"),
    ([{"id": "1", "input": "x", "profile": [{"id": "p", "tag": "comedy"}]}], None, r"profile\[0\] \(id p\) lacks field 'description'"),
    ([{"id": "1", "input": "x", "profile": [{"id": "p", "description": "d", "tag": "western"}]}], None, "not a LaMP-2M label"),
    ([{"id": "1", "input": "x", "profile": []}], [{"id": "1", "output": "western"}], "not a LaMP-2M label"),
    ([{"id": "1", "input": "x", "profile": [{"id": "p", "description": "d", "tag": "comedy"}]}], [{"id": "2", "output": "comedy"}],
     "record 0 .id 1.: .*has no gold for it"),
])
def test_bad_records_name_the_file_and_record(tmp_path, questions, golds, message):
    with pytest.raises(TaskDataError, match=message):
        load_users(_lamp(tmp_path, questions, golds), LAMP_2M)


def test_invalid_json_is_a_clear_error(tmp_path):
    (tmp_path / "dev_questions.json").write_text("[{")
    with pytest.raises(TaskDataError, match="dev_questions.json: cannot read JSON"):
        load_users(tmp_path, LAMP_2M)


def test_a_saved_hugging_face_dataset_loads_like_the_json_files(tmp_path):
    import datasets

    json_dir = write_dataset(tmp_path / "json", LAMP_2M, n_users=3, n_history=5, n_queries=2, seed=4)
    questions = json.loads((json_dir / "dev_questions.json").read_text())
    golds = {g["id"]: g["output"] for g in json.loads((json_dir / "dev_outputs.json").read_text())["golds"]}
    rows = [{**q, "output": golds[q["id"]]} for q in questions]
    datasets.DatasetDict({"dev": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "hf"))
    from dataclasses import replace

    # the same users; the planted rules come from the generator's rules.json, which a dataset lacks
    assert load_users(tmp_path / "hf", LAMP_2M) == [replace(u, rule=None) for u in load_users(json_dir, LAMP_2M)]
    with pytest.raises(TaskDataError, match="no split 'test'"):
        load_users(tmp_path / "hf", LAMP_2M, split="test")
    rows[1]["output"] = "western"  # a bad gold inside the dataset is named like any other
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "hf2"))
    with pytest.raises(TaskDataError, match=r"hf2: golds\[1\].*not a LaMP-2M label"):
        load_users(tmp_path / "hf2", LAMP_2M)


def _sentences(text: str) -> set[str]:
    """Its sentences (and titles) of four words or more, as written."""
    return {s.strip(' "').lower() for s in re.split(r'[.:;!?"]\s+|[.:;!?"]$|\(|\)', text) if len(s.split()) >= 4}


def _shown(task, query: str) -> str:
    """What a query shows of its item: the content, and any candidates it offers (LaMP-1)."""
    offered = re.findall(task.candidates_pattern, query) if task.candidates_pattern else []
    return ". ".join([task.query_content(query), *(text for _, text in offered)])


def _reuse(task, questions) -> tuple[int, float]:
    """(queries sharing a sentence, cue or title phrase with their user's history, what copying the
    most similar history item's label scores)."""
    from persona_agent.data.synthetic import calibrate

    shared = 0
    for q in questions:
        seen = set().union(*(_sentences(task.item_text(it)) for it in q["profile"]))
        shared += bool(_sentences(_shown(task, q["input"])) & seen)
    golds = {q["id"]: q["gold"] for q in questions}
    rules = {q["user_id"]: q["rule"] for q in questions}
    return shared, calibrate(task, questions, golds, rules=rules).lookup


def _questions(task, seed=0, **kwargs):
    questions, outputs, rules = generate(task, n_users=8, n_history=40, n_queries=6, seed=seed, **kwargs)
    golds = {g["id"]: g["output"] for g in outputs["golds"]}
    return [{**q, "gold": golds[q["id"]], "rule": rules[q["user_id"]]} for q in questions]


@pytest.mark.parametrize("key", sorted(TASKS))
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("which", SETS)
def test_no_query_reuses_its_history_and_copying_scores_at_most_one_half(key, seed, which):
    shared, lookup = _reuse(TASKS[key], _questions(TASKS[key], seed, **set_options(which)))
    assert shared == 0
    assert lookup <= 0.5


@pytest.mark.parametrize("key", sorted(TASKS))
def test_the_reuse_check_sees_a_query_that_copies_its_history(key):
    # the check itself, on a set where each query quotes a history item (and for LaMP-1 cites the
    # user's own paper): it must fire on every task, or it checks nothing
    task = TASKS[key]
    questions = _questions(task)
    for q in questions:
        item = q["profile"][len(q["id"]) % len(q["profile"])]
        if task.key == "lamp1":
            cited = q["input"].split(f"{q['gold']}: ")[1].split(' [')[0]
            q["input"] = q["input"].replace(cited, f'"{task.item_text(item)}"')
        else:
            q["input"] = task.make_input(task.item_text(item), task.labels)
            q["gold"] = task.item_response(item)
    shared, lookup = _reuse(task, questions)
    assert shared == len(questions)
    assert lookup > 0.5


@pytest.mark.parametrize("key", sorted(TASKS))
def test_the_shipped_sets_cannot_answer_themselves(key):
    task = TASKS[key]
    questions = json.loads((shipped_data_dir(task) / "dev_questions.json").read_text())
    golds = {g["id"]: g["output"] for g in json.loads((shipped_data_dir(task) / "dev_outputs.json").read_text())["golds"]}
    rules = json.loads((shipped_data_dir(task) / "rules.json").read_text())
    questions = [{**q, "gold": golds[q["id"]], "rule": rules[q["user_id"]]} for q in questions]
    assert len(questions) == 48
    assert _reuse(task, questions) == (0, pytest.approx(_reuse(task, questions)[1]))
    assert _reuse(task, questions)[1] <= 0.5


# -- time: one history per question, dates parsed, nothing from the question's future ------------


def _dated(tmp_path, profile_dates, questions):
    """A LaMP-2M directory: `questions` is [(id, user, date or None, [profile indices])]."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    items = [{"id": f"h{i}", "description": f"A film about a heist number {i}.", "tag": "action", "date": d}
             for i, d in enumerate(profile_dates)]
    records = [{"id": qid, "user_id": user, "input": LAMP_2M.make_input("A film about a chase.", LAMP_2M.labels),
                "profile": [items[i] for i in picks], **({"date": when} if when else {})}
               for qid, user, when, picks in questions]
    (tmp_path / "dev_questions.json").write_text(json.dumps(records))
    (tmp_path / "dev_outputs.json").write_text(json.dumps({"task": "LaMP_2M", "golds": [
        {"id": qid, "output": "action"} for qid, *_ in questions]}))
    return tmp_path


@pytest.mark.parametrize("dates, order", [
    (["1000000000", "999999999", "1000000001"], ["h1", "h0", "h2"]),   # unix seconds: 999999999 is first
    (["01/02/2012", "12/30/2011", "1/3/2012"], ["h1", "h0", "h2"]),    # M/D/Y: 2011 before 2012
    (["2012-01-02T10:00:00Z", "2012-01-02T11:00:00+02:00", "2012-01-02"], ["h2", "h1", "h0"]),  # offsets to UTC
])
def test_history_is_in_time_order_whatever_the_date_format(tmp_path, dates, order):
    (user,) = load_users(_dated(tmp_path, dates, [("q", "u", None, [0, 1, 2])]), LAMP_2M)
    assert [it["id"] for it in user.history] == order  # as text, each of these sorts the other way
    assert [it["date"] for it in user.history] == sorted(it["date"] for it in user.history)  # stored text sorts too


def test_questions_of_one_user_keep_their_own_histories_and_see_only_their_past(tmp_path):
    dates = ["2012-01-01", "2012-01-05", "2012-01-09"]
    # q1 was asked on Jan 6 about a history that already holds the Jan 9 item (a later question's)
    users = load_users(_dated(tmp_path, dates, [("q1", "u", "2012-01-06", [0, 1, 2]), ("q2", "u", "2012-01-10", [0, 1, 2]),
                                                ("q3", "u", "2012-01-12", [0, 1, 2])]), LAMP_2M)
    by_query = {q.id: u for u in users for q in u.queries}
    assert [it["id"] for it in by_query["q1"].history] == ["h0", "h1"]  # nothing on or after its date
    assert [it["id"] for it in by_query["q2"].history] == ["h0", "h1", "h2"]
    assert by_query["q2"] is by_query["q3"]  # the same history: one unit, asked twice
    assert by_query["q1"].unit != by_query["q2"].unit
    assert {u.user_id for u in users} == {"u"}


def test_a_question_never_sees_an_item_dated_on_its_own_date(tmp_path):
    users = load_users(_dated(tmp_path, ["2012-01-01", "2012-01-06"], [("q", "u", "2012-01-06", [0, 1])]), LAMP_2M)
    assert [it["id"] for it in users[0].history] == ["h0"]


@pytest.mark.parametrize("dates, message", [
    (["2012-01-01", "1325376000"], r"record 0 \(id q\): profile\[1\] \(id h1\): date '1325376000' is unix seconds, "
                                   r"but .*profile\[0\] \(id h0\) is ISO 8601"),
    (["2012-01-01", "yesterday"], r"profile\[1\] \(id h1\): unreadable date"),
    (["13/45/2012"], r"profile\[0\] \(id h0\): unreadable date"),
])
def test_a_file_mixing_date_formats_or_with_an_unreadable_date_is_refused_naming_the_record(tmp_path, dates, message):
    with pytest.raises(TaskDataError, match=message):
        load_users(_dated(tmp_path, dates, [("q", "u", None, list(range(len(dates))))]), LAMP_2M)


def test_eval_on_a_file_mixing_date_formats_exits_2_naming_the_record(tmp_path, capsys):
    from persona_agent.cli import main

    data = _dated(tmp_path / "data", ["2012-01-01", "12/30/2011"], [("q", "u", None, [0, 1])])
    code = main(["eval", "--data", str(data), "--lm", "scripted", "--store", str(tmp_path / "store")])
    err = capsys.readouterr().err
    assert code == 2
    assert "profile[1] (id h1): date '12/30/2011' is M/D/Y" in err
    assert "Traceback" not in err
