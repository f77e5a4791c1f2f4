"""Scoring parity: the project's metrics equal an independent re-implementation of LaMP's official
evaluation (`eval/evaluation.py` in the LaMP repository, which needs the hub at run time), on
random answers for all four tasks.

LaMP's semantics, written here from its description and not from the project's code: strip both
sides; map each label to its index in the task's label list, or -1; accuracy over the indices;
macro-F1 over `labels=range(len(labels))` (a label never predicted nor true scores 0, a -1
prediction is a miss for its true label); LaMP-3: `float(answer)`, or when that fails the farther
of 1 and 5 from the gold; MAE and RMSE."""

import math
import random

import numpy as np
import pytest

from persona_agent.data.tasks import LAMP_1, LAMP_2M, LAMP_2N, LAMP_3


def lamp_classification(preds: list, golds: list, labels: list[str]) -> dict:
    index = {label: i for i, label in enumerate(labels)}
    p = np.array([index.get(str(x).strip(), -1) for x in preds])
    g = np.array([index.get(str(x).strip(), -1) for x in golds])
    confusion = np.zeros((len(labels), len(labels) + 1))  # last column: predicted -1
    for gi, pi in zip(g, p):
        confusion[gi, pi if pi >= 0 else len(labels)] += 1
    tp = np.diag(confusion[:, :len(labels)])
    predicted = confusion[:, :len(labels)].sum(axis=0)
    actual = confusion.sum(axis=1)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, actual, out=np.zeros_like(tp), where=actual > 0)
    denominator = precision + recall
    f1 = np.divide(2 * precision * recall, denominator, out=np.zeros_like(tp), where=denominator > 0)
    return {"accuracy": float((p == g).mean()), "f1": float(f1.mean())}


def lamp_rating(preds: list, golds: list) -> dict:
    def read(x, y):
        try:
            return float(x)
        except (TypeError, ValueError):
            y = float(y)
            return 1.0 if abs(1 - y) > abs(5 - y) else 5.0
    p = np.array([read(x, y) for x, y in zip(preds, golds)])
    g = np.array([float(y) for y in golds])
    return {"mae": float(np.abs(p - g).mean()), "rmse": float(math.sqrt(((p - g) ** 2).mean()))}


def _random_answers(rng: random.Random, labels: tuple[str, ...], n: int) -> list:
    noise = ["", " ", "none", "I think it is", "Comedy", "[3]", "sci fi", "4.5", "10", "0", "-1", "nan text", None]
    out = []
    for _ in range(n):
        roll = rng.random()
        label = rng.choice(labels)
        out.append(label if roll < 0.5 else f"  {label}\n" if roll < 0.65 else rng.choice(noise))
    return out


@pytest.mark.parametrize("task", [LAMP_1, LAMP_2M, LAMP_2N], ids=lambda t: t.key)
@pytest.mark.parametrize("seed", range(5))
def test_classification_scores_equal_lamps_official_evaluation(task, seed):
    rng = random.Random(seed)
    golds = [rng.choice(task.labels) for _ in range(60)]
    answers = _random_answers(rng, task.labels, len(golds))
    ours = task.score(golds, answers)
    theirs = lamp_classification(["" if a is None else a for a in answers], golds, list(task.labels))
    assert ours["accuracy"] == pytest.approx(theirs["accuracy"], abs=1e-12)
    assert ours["f1"] == pytest.approx(theirs["f1"], abs=1e-12)


@pytest.mark.parametrize("seed", range(5))
def test_rating_scores_equal_lamps_official_evaluation(seed):
    rng = random.Random(seed)
    golds = [rng.choice(LAMP_3.labels) for _ in range(60)]
    readable = ["4", "4.0", " 3 ", 2, 5.0, "1.5", "10", "0"]
    unreadable = ["four", "", "4 stars", None, "★★★"]
    answers = [rng.choice(readable if rng.random() < 0.7 else unreadable) for _ in golds]
    ours = LAMP_3.score(golds, answers)
    theirs = lamp_rating(answers, golds)
    assert ours["mae"] == pytest.approx(theirs["mae"], abs=1e-12)
    assert ours["rmse"] == pytest.approx(theirs["rmse"], abs=1e-12)


def test_the_reimplementation_is_not_the_projects_own_code_path():
    # Guard against a parity test that compares a thing with itself: a known case by hand.
    labels = ["a", "b", "c"]
    # golds a a b c, preds a b b x: acc 2/4; F1 a = 2*1*.5/1.5 = 2/3, b = 2*.5*1/1.5 = 2/3, c = 0
    assert lamp_classification(["a", "b", "b", "x"], ["a", "a", "b", "c"], labels) == pytest.approx(
        {"accuracy": 0.5, "f1": (2 / 3 + 2 / 3 + 0) / 3})
    # gold 3, unreadable: LaMP picks 5 (|1-3| > |5-3| is false): error 2; gold 2 -> 5: error 3
    assert lamp_rating(["x", "x"], ["3", "2"]) == pytest.approx({"mae": 2.5, "rmse": math.sqrt((4 + 9) / 2)})
