"""Acceptance strategies: which rewrite ships, from the scores of the same batch (and slice)."""

import dspy
import pytest

from persona_agent.data.tasks import LAMP_2M, LAMP_3
from persona_agent.optimizers import AcceptValid, ConsistentImprovement, Outcome, StrictImprovement, TieBreakByAgreement
from persona_agent.optimizers.acceptance import Trial, agreement

LEAD = "Tags this user gives most, strongest first: "
BATCH = [dspy.Example(query=LAMP_2M.make_input(f"Item {i}.", LAMP_2M.labels), answer=a)
         for i, a in enumerate(["dystopia", "dystopia", "action"])]


def trial(current, candidate, before="action, fantasy, dystopia.", after="dystopia, action, fantasy.", **kw):
    return Trial(LAMP_2M, BATCH, LEAD + before, LEAD + after, current, candidate, **kw)


def test_strict_improvement_ships_only_a_better_score():
    strict = StrictImprovement()
    assert strict(trial(0.33, 0.67)) is Outcome.ACCEPTED
    assert strict(trial(0.67, 0.33)) is Outcome.BATCH_DROPPED
    assert strict(trial(0.33, 0.33)) is Outcome.TIED
    # a tie ships when the held-out slice improves, never when it drops
    assert strict(trial(0.33, 0.33, current_holdout=0.5, candidate_holdout=1.0)) is Outcome.ACCEPTED
    assert strict(trial(0.33, 0.67, current_holdout=0.5, candidate_holdout=0.0)) is Outcome.HELDOUT_DROPPED


def test_the_papers_rule_ships_every_checked_rewrite_unscored():
    assert AcceptValid().needs_scores is False
    assert AcceptValid()(trial(None, None)) is Outcome.ACCEPTED


def test_agreement_breaks_a_tie_by_how_well_the_rewrite_predicts_the_real_answers():
    agree = TieBreakByAgreement()
    # the batch's real answers are dystopia, dystopia, action: the rewrite ranks dystopia first
    assert agreement(LAMP_2M, LEAD + "dystopia, action, fantasy.", BATCH) > \
        agreement(LAMP_2M, LEAD + "action, fantasy, dystopia.", BATCH)
    assert agree(trial(0.33, 0.33)) is Outcome.ACCEPTED
    # the other way round it is a tie that keeps the current persona
    assert agree(trial(0.33, 0.33, before="dystopia, action.", after="action, dystopia.")) is Outcome.TIED
    # it breaks ties only: a drop is still a drop
    assert agree(trial(0.67, 0.33)) is Outcome.BATCH_DROPPED
    assert agree(trial(0.33, 0.33, current_holdout=1.0, candidate_holdout=0.5)) is Outcome.HELDOUT_DROPPED


def _history(*answers):
    return [dspy.Example(query=LAMP_2M.make_input(f"Old item {i}.", LAMP_2M.labels), answer=a)
            for i, a in enumerate(answers)] + BATCH


def test_consistent_improvement_refuses_a_rewrite_the_longer_window_contradicts():
    consistent = ConsistentImprovement()
    drops = "dystopia, fantasy."  # a rewrite that fits the batch's two dystopia and drops action
    # a user who did not change: the three before the batch were action, and so is the batch's
    # last; the rewrite fits the batch better and the latest six worse
    stable = _history("fantasy", "action", "action", "action")
    assert consistent(trial(0.33, 0.67, after=drops, history=stable)) is Outcome.DISAGREES
    assert StrictImprovement()(trial(0.33, 0.67, after=drops, history=stable)) is Outcome.ACCEPTED  # strict ships it
    # a user who did change chose dystopia before the batch too: the rewrite ships
    moved = _history("action", "dystopia", "dystopia", "dystopia")
    assert consistent(trial(0.33, 0.67, after=drops, history=moved)) is Outcome.ACCEPTED
    # the window is twice the batch unless set: over the batch alone the rewrite agrees better
    assert ConsistentImprovement(window=3)(trial(0.33, 0.67, after=drops, history=stable)) is Outcome.ACCEPTED
    # it only ever refuses what strict would ship
    assert consistent(trial(0.67, 0.33, after=drops, history=moved)) is Outcome.BATCH_DROPPED
    assert consistent(trial(0.33, 0.33, after=drops, history=moved)) is Outcome.TIED
    assert consistent(trial(0.33, 0.67, after=drops)) is Outcome.ACCEPTED  # no history given: as strict


def test_agreement_reads_a_rating_tendency():
    batch = [dspy.Example(query=LAMP_3.make_input("Fine.", LAMP_3.labels), answer=s) for s in ("5", "5", "4")]
    generous = "This user scores more generously than the review reads."
    assert agreement(LAMP_3, generous, batch) > agreement(LAMP_3, "This user scores as the review reads.", batch)


@pytest.mark.parametrize("outcome", list(Outcome))
def test_an_outcome_reads_as_its_words(outcome):
    assert str(outcome) == outcome.value
    assert f"{outcome}" == outcome.value
