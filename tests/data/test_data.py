import json
from collections import Counter

import pytest

from persona_agent.data.loaders import load_users
from persona_agent.data.synthetic import generate, shipped_data_dir, write_dataset
from persona_agent.data.tasks import LAMP_2M, TASKS, TaskDataError
from persona_agent.pipelines.flow import examples
from persona_agent.pipelines.memory import history_items


@pytest.mark.parametrize("key", sorted(TASKS))
def test_shipped_data_loads_for_every_task(key):
    task = TASKS[key]
    users = load_users(shipped_data_dir(task), task)
    assert len(users) == 8
    for u in users:
        assert len(u.queries) == 6 and all(q.gold in task.labels for q in u.queries)
        dates = [it["date"] for it in u.profile]
        assert dates == sorted(dates)
        # LaMP-1 papers carry no decision: its interactions are built from the 39 papers after the first
        assert len(examples(task, history_items(task, u.profile))) == (39 if key == "lamp1" else 40)


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
        for it in u.profile:
            text = task.item_text(it).lower()
            cued = [lab for lab in task.labels if _cues(key, lab, text)]
            assert task.item_response(it) in cued and len(cued) >= 2
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
    assert user.user_id == "a" and user.queries[0].gold == "action" and history_items(LAMP_2M, user.profile)[0].response == "comedy"


def _lamp(tmp_path, questions, golds=None):
    (tmp_path / "dev_questions.json").write_text(json.dumps(questions))
    if golds is not None:
        (tmp_path / "dev_outputs.json").write_text(json.dumps({"task": "LaMP_2", "golds": golds}))
    return tmp_path


def test_lamp_without_outputs_has_no_golds(tmp_path):
    users = load_users(_lamp(tmp_path, [{"id": "7", "input": "description: y",
                                         "profile": [{"id": "p", "description": "d", "tag": "comedy"}]}]), LAMP_2M)
    assert users[0].user_id == "7" and users[0].queries[0].gold is None


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
    assert load_users(tmp_path / "hf", LAMP_2M) == load_users(json_dir, LAMP_2M)
    with pytest.raises(TaskDataError, match="no split 'test'"):
        load_users(tmp_path / "hf", LAMP_2M, split="test")
    rows[1]["output"] = "western"  # a bad gold inside the dataset is named like any other
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "hf2"))
    with pytest.raises(TaskDataError, match=r"hf2: golds\[1\].*not a LaMP-2M label"):
        load_users(tmp_path / "hf2", LAMP_2M)


def _self_answering(task, questions) -> int:
    """Queries whose item (or, for LaMP-1, a candidate reference) is in the user's own history."""
    n = 0
    for q in questions:
        shown = {task.item_text(it) for it in q["profile"]} | {f'"{it["title"]}"' for it in q["profile"] if "title" in it}
        n += task.query_content(q["input"]) in shown or any(s in q["input"] for s in shown if s.startswith('"'))
    return n


@pytest.mark.parametrize("key", sorted(TASKS))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_no_query_can_be_answered_by_looking_it_up_in_the_history(key, seed):
    questions, _, _ = generate(TASKS[key], n_users=8, n_history=40, n_queries=6, seed=seed)
    assert _self_answering(TASKS[key], questions) == 0


@pytest.mark.parametrize("key", sorted(TASKS))
def test_the_shipped_sets_cannot_answer_themselves(key):
    task = TASKS[key]
    questions = json.loads((shipped_data_dir(task) / "dev_questions.json").read_text())
    assert len(questions) == 48 and _self_answering(task, questions) == 0
