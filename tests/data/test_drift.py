"""Users whose preferences move (`make-data --drift`), and the readable level: the old rule
answers none of the queries, the new one all of them, the latest history follows the new one."""

import json

import pytest

from persona_agent.cli import main
from persona_agent.data import synthetic
from persona_agent.data.loaders import load_users
from persona_agent.data.synthetic import RECENT, SETS, generate, planted, shipped_data_dir
from persona_agent.data.tasks import TASKS, named_labels


def _old(rule: dict) -> dict:
    return {**rule["drift"]["from"], **({"level": rule["level"]} if "level" in rule else {})}


@pytest.mark.parametrize("key", sorted(TASKS))
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("level", synthetic.LEVELS)
def test_the_old_rule_fails_every_query_and_the_new_one_answers_it(key, seed, level):
    task = TASKS[key]
    questions, outputs, rules = generate(task, n_users=8, n_history=40, n_queries=6, seed=seed, level=level, drift=True)
    golds = {g["id"]: g["output"] for g in outputs["golds"]}
    for q in questions:
        rule = rules[q["user_id"]]
        assert planted(task, rule, q["input"]) == golds[q["id"]]
        assert planted(task, _old(rule), q["input"]) != golds[q["id"]]  # A and B answer it differently


@pytest.mark.parametrize("key", ["lamp2m", "lamp2n", "lamp3"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_latest_interactions_follow_the_new_rule_and_the_older_the_old(key, seed):
    task = TASKS[key]
    questions, _, rules = generate(task, n_users=8, n_history=40, n_queries=6, seed=seed, level="readable", drift=True)
    for q in questions[::6]:  # one per user: they share the history
        rule, history = rules[q["user_id"]], q["profile"]
        since = rule["drift"]["on"]
        assert [it["date"] >= since for it in history] == [False] * (40 - RECENT) + [True] * RECENT
        assert RECENT >= 2 * 3  # at least twice the default alignment batch
        for it in history:
            follows = rule if it["date"] >= since else _old(rule)
            assert planted(task, follows, task.make_input(task.item_text(it), task.labels)) == task.item_response(it)
        assert all(q["date"] > it["date"] for it in history)


@pytest.mark.parametrize("key", ["lamp2m", "lamp2n"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_before_the_change_the_user_passed_the_moved_label_over(key, seed):
    """Older items cue the label that later moves to the top, and the user chose another there:
    the whole history shows it chosen only lately, so a summary of that history lags behind."""
    task = TASKS[key]
    questions, _, rules = generate(task, n_users=8, n_history=40, n_queries=6, seed=seed, level="readable", drift=True)
    passed_over = 0
    for q in questions[::6]:
        rule = rules[q["user_id"]]
        moved = next(iter(rule.values()))[0]
        old = [it for it in q["profile"] if it["date"] < rule["drift"]["on"]]
        cueing = [it for it in old if moved in named_labels(task.labels, task.item_text(it).lower())]
        assert all(task.item_response(it) != moved for it in cueing)
        passed_over += len(cueing)
    assert passed_over >= 8  # about two per user: as often as any label outside A's first two


def test_rules_keep_both_rules_and_the_change_date(tmp_path, capsys):
    assert main(["make-data", str(tmp_path), "--task", "lamp2m", "--users", "3", "--drift", "--level", "readable"]) == 0
    out = capsys.readouterr().out
    assert "stale rule" in out
    assert "readable, drifting" in out
    rules = json.loads((tmp_path / "rules.json").read_text())
    for rule in rules.values():
        assert rule["tag_priority"] != rule["drift"]["from"]["tag_priority"]
        assert rule["level"] == "readable"
        assert rule["drift"]["on"].startswith("2024-")
        moved = rule["tag_priority"][0]
        assert rule["drift"]["from"]["tag_priority"].index(moved) >= 10  # a label A ranks low moves to the top


def test_a_drift_set_the_old_rule_still_answers_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(synthetic, "MAX_STALE", -1.0)
    assert main(["make-data", str(tmp_path), "--task", "lamp3", "--users", "2", "--drift"]) == 2
    assert "old rule still answers" in capsys.readouterr().err
    assert not (tmp_path / "rules.json").exists()


@pytest.mark.parametrize("which", SETS)
@pytest.mark.parametrize("key", sorted(TASKS))
def test_every_shipped_set_loads_and_drifts_as_named(key, which):
    task = TASKS[key]
    users = load_users(shipped_data_dir(task, which), task)
    assert len(users) == 8
    assert all(len(u.queries) == 6 for u in users)
    assert all(("drift" in u.rule) == which.endswith("drift") for u in users)
    assert all((u.rule.get("level") == "readable") == which.startswith("readable") for u in users)
    # what the shipped files hold is what the generator writes for them today
    questions, _, _ = generate(task, n_users=8, n_history=40, n_queries=6, seed=0, **synthetic.set_options(which))
    assert json.loads((shipped_data_dir(task, which) / "dev_questions.json").read_text()) == questions
