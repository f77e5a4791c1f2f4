import math

import pytest

from persona_agent.data.tasks import LAMP_1, LAMP_2M, LAMP_2N, LAMP_3, TaskDataError, classification_metrics, get_task
from persona_agent.overrides import engine_of


def test_lookup_by_any_spelling():
    assert get_task("LaMP-2M") is LAMP_2M
    assert get_task("lamp_3") is LAMP_3
    assert get_task("LaMP_1") is LAMP_1
    with pytest.raises(TaskDataError, match="unknown task"):
        get_task("lamp9")


@pytest.mark.parametrize("raw,label", [
    ("comedy", "comedy"), (" Comedy.", "comedy"), ('"sci-fi"', "sci-fi"), ("The tag is dark comedy", "dark comedy"),
    ("comedy or action", None), ("banana", None), (None, None), ("", None),
])
def test_normalize_movie_tags(raw, label):
    assert LAMP_2M.normalize(raw) == label


def test_normalize_other_tasks():
    assert LAMP_1.normalize("[2]") == "[2]"
    assert LAMP_1.normalize("1") == "[1]"
    assert LAMP_1.normalize("[3]") is None
    assert LAMP_3.normalize("4 stars") == "4"
    assert LAMP_3.normalize("seven") is None
    assert LAMP_2N.normalize("Style & Beauty") == "style & beauty"


def test_label_list_is_parsed_in_any_order_and_unknown_labels_fail():
    q = LAMP_2N.make_input("text", ["sports", "crime", "travel"])
    assert LAMP_2N.parse_labels(q) == ("sports", "crime", "travel")
    with pytest.raises(TaskDataError, match="unknown labels"):
        LAMP_2M.parse_labels("tags: [comedy, western] description: x")


def test_query_content_strips_the_instructions():
    q = LAMP_2M.make_input("A film about a heist.", LAMP_2M.labels)
    assert LAMP_2M.query_content(q) == "A film about a heist."


def test_classification_metrics_by_hand():
    # golds a,a,b,c ; preds a,b,b,None over labels a,b,c,d
    m = classification_metrics(["a", "a", "b", "c"], ["a", "b", "b", None], ["a", "b", "c", "d"])
    assert m["accuracy"] == pytest.approx(0.5)
    # F1: a = 2/3 (tp1 fn1), b = 2/3 (tp1 fp1), c = 0, d = 0 (never seen: counts as 0)
    assert m["f1"] == pytest.approx((2 / 3 + 2 / 3) / 4)


def test_out_of_set_answer_is_wrong():
    # comedy: F1 1; action: missed (F1 0); the 13 unseen labels count as 0 in the macro average
    assert LAMP_2M.score(["comedy", "action"], ["comedy", "western"]) == pytest.approx({"accuracy": 0.5, "f1": 1 / 15})


def test_rating_metrics_unparseable_counts_as_farther_extreme():
    m = LAMP_3.score(["5", "2", "4"], ["4", "no idea", "4"])
    errs = [1, 3, 0]  # "no idea" for gold 2 -> 5 is farther than 1
    assert m["mae"] == pytest.approx(sum(errs) / 3)
    assert m["rmse"] == pytest.approx(math.sqrt(sum(e * e for e in errs) / 3))


def test_example_score_is_graded_for_ratings():
    assert LAMP_3.example_score("3", "3") == 1
    assert LAMP_3.example_score("3", "5") == 0.5
    assert LAMP_2M.example_score("comedy", "Comedy") == 1
    assert LAMP_2M.example_score("comedy", "action") == 0


def test_official_scoring_reads_answers_as_lamps_scorer_does():
    # exact label after stripping: a capitalised or padded-with-words label is invalid, not wrong-but-lenient
    assert LAMP_2M.score(["comedy", "comedy", "comedy"], [" comedy ", "Comedy", "I think comedy"])["accuracy"] == 1 / 3
    assert LAMP_2M.score(["comedy", "comedy"], ["Comedy", "comedy."], lenient=True)["accuracy"] == 1
    assert LAMP_2M.invalid([" comedy ", "Comedy", "western", None]) == 3
    # ratings are floats: "4.5" is off by 0.5 and "10" by 6, never rounded or cut to a digit
    assert LAMP_3.score(["4", "4"], ["4.5", "10"])["mae"] == pytest.approx((0.5 + 6) / 2)
    assert LAMP_3.score(["4"], ["4 stars"])["mae"] == 3
    assert LAMP_3.invalid(["4 stars", "4.0", "nan"]) == 2
    assert LAMP_3.errors(["2", "5"], ["3", "x"]) == [1.0, 4.0]
    assert LAMP_2M.errors(["comedy"], ["action"]) == [1.0]


@pytest.mark.parametrize("raw", ["4", "4.0", 4, 4.0, " 4 "])
def test_a_rating_is_read_as_lamp_reads_it_whatever_its_json_type(raw, fake_lm):
    from persona_agent.pipelines.agent import non_personalized

    engine_of(fake_lm).policy = lambda fields, s, u: {"answer": raw}
    answer = non_personalized(LAMP_3)(query=LAMP_3.make_input("Solid and reliable.", LAMP_3.labels)).answer
    assert answer == "4"
    assert LAMP_3.score(["4"], [answer])["mae"] == 0.0


@pytest.mark.parametrize("raw, label", [("10", None), ("0", None), ("4.5", None), ("4 stars", "4"), ("5/5", "5"),
                                        ("3.0", "3"), (2, "2"), (True, None)])
def test_normalize_reads_only_whole_ratings_from_1_to_5(raw, label):
    assert LAMP_3.normalize(raw) == label


def test_the_first_profiles_order_comes_from_choices_where_items_name_their_labels():
    """A user who ranks fantasy first but meets it rarely gives action more often: counted, action
    leads; read as choices between the labels each item names, fantasy (never passed over) does."""
    items = ([("A film that is fantasy and action.", "fantasy")] * 2
             + [("A film that is action and comedy.", "action")] * 5
             + [("A film that is comedy and romance.", "comedy")] * 2)
    order = LAMP_2M.choice_order(items)
    assert [label for label, _, _ in order] == ["fantasy", "action", "comedy"]
    assert order[0] == ("fantasy", 2, 2)
    assert order[1] == ("action", 5, 7)
    facts = LAMP_2M.facts(items, by_choice=True)
    assert facts.startswith("labels they chose over the others an item named, strongest first: fantasy (2 of 2 times)")
    # the rewriter's facts on a batch of whole requests (every label in their list) stay counts
    assert LAMP_2M.facts(items) == "labels they gave, most often first: action (5 times), fantasy (2 times), comedy (2 times)"


def test_where_items_do_not_name_their_labels_the_counts_stay():
    items = [("A heist in the rain.", "action")] * 5 + [("A wizard's tale.", "fantasy")] * 2
    assert LAMP_2M.choice_order(items) == []
    assert LAMP_2M.facts(items, by_choice=True) == "labels they gave, most often first: action (5 times), fantasy (2 times)"
    # one naming item in nine is too few to order anything by
    few = items + [("A film that is fantasy and action.", "fantasy")] + [("A dull one.", "comedy")]
    assert LAMP_2M.choice_order(few) == []


def test_a_longer_label_named_is_not_also_its_shorter_part():
    assert LAMP_2M.choice_order([("A film that is dark comedy and romance.", "dark comedy")] * 3) == [
        ("dark comedy", 3, 3)]


def test_a_rating_stated_in_a_review_is_no_choice_between_labels():
    items = [("Works fine. It reads as a 4, or a 3 on a bad day.", "4")] * 6
    assert LAMP_3.choice_order(items) == []
    assert LAMP_3.facts(items).startswith("their scores")
