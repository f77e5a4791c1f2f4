"""Which rewrite ships: acceptance as a strategy given to `PersonaAlignment` (as GEPA keeps its
acceptance criteria apart from its search), and what an iteration came to as a typed `Outcome`.

A strategy sees a `Trial`, the current persona and the candidate scored on the same batch (and
held-out slice), and returns an `Outcome`. One that does not need scores (`needs_scores`
False) is asked before any replay of the candidate, with the candidate's scores None.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Protocol, Sequence


class Outcome(str, Enum):
    """How an iteration ended. Its value is the words a report counts it by."""

    ACCEPTED = "accepted"
    PERFECT = "batch already answered perfectly"  # nothing to correct: no critique, no rewrite
    NOTHING_WRITTEN = "no new profile was written"
    REFUSED = "refused by the profile check"  # `AlignmentStep.problem` says why
    BATCH_DROPPED = "batch score dropped"
    HELDOUT_DROPPED = "held-out score dropped"
    DISAGREES = "agrees worse with the latest interactions"
    TIED = "tied the current persona"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class Trial:
    """A candidate against the persona it would replace, on the same interactions."""

    task: object  # the `Task`
    batch: Sequence  # the replayed interactions (`dspy.Example(query, answer)`)
    current_profile: str
    candidate_profile: str
    current: float | None = None  # batch scores
    candidate: float | None = None
    current_holdout: float | None = None  # held-out slice scores (None: no slice)
    candidate_holdout: float | None = None
    history: Sequence = ()  # every interaction the alignment was given, oldest first (the batch last)


class Acceptance(Protocol):
    needs_scores: bool

    def __call__(self, trial: Trial) -> Outcome: ...


class StrictImprovement:
    """Ship a rewrite that scores better on the batch, or ties there and does better on the
    held-out slice; never one that scores worse on the slice. A tie keeps the current persona,
    so a noisy rewriter cannot walk a good persona away on evidence that cannot tell them apart."""

    needs_scores = True

    def __call__(self, trial: Trial) -> Outcome:
        if trial.candidate < trial.current:
            return Outcome.BATCH_DROPPED
        if trial.candidate_holdout is not None and trial.candidate_holdout < trial.current_holdout:
            return Outcome.HELDOUT_DROPPED
        if trial.candidate > trial.current or (
                trial.candidate_holdout is not None and trial.candidate_holdout > trial.current_holdout):
            return Outcome.ACCEPTED
        return self.on_tie(trial)

    def on_tie(self, trial: Trial) -> Outcome:
        return Outcome.TIED


class AcceptValid:
    """The paper's loop: every rewrite that passes the profile check ships, unscored."""

    needs_scores = False

    def __call__(self, trial: Trial) -> Outcome:
        return Outcome.ACCEPTED


class TieBreakByAgreement(StrictImprovement):
    """As `StrictImprovement`, but a tie on the batch (the held-out slice not worse) ships when
    the rewrite's stated preferences agree better with the batch's real answers: the mean over
    the batch of the weight the profile gives the user's real answer (`Task.prior`: 1 for a
    first-ranked label, towards 0 down the ranking, 0 for one it does not name; for a tendency,
    how it tilts the real score). No LM call. Where the answer step cannot yet show a change the
    latest interactions do (the item supports one label only), a profile that names it still
    ships, and the next item that allows the choice gets it."""

    def on_tie(self, trial: Trial) -> Outcome:
        return Outcome.ACCEPTED if agreement(trial.task, trial.candidate_profile, trial.batch) > \
            agreement(trial.task, trial.current_profile, trial.batch) else Outcome.TIED


class ConsistentImprovement(StrictImprovement):
    """As `StrictImprovement`, and a rewrite that scores better must not agree worse than the
    current persona with the user's latest `window` interactions (default: twice the batch, the
    batch included; `agreement`, no LM call). A rewrite that fits three items by dropping what
    the older ones show (a user who did not change, whose batch happened to favour one label)
    agrees worse over the longer window; a user who did change made the same choice throughout
    it, and the rewrite that follows them agrees better there too."""

    def __init__(self, window: int | None = None):
        self.window = window

    def __call__(self, trial: Trial) -> Outcome:
        outcome = super().__call__(trial)
        if outcome is not Outcome.ACCEPTED or not trial.history:
            return outcome
        recent = list(trial.history)[-(self.window or 2 * len(trial.batch)):]
        if agreement(trial.task, trial.candidate_profile, recent) < agreement(trial.task, trial.current_profile, recent):
            return Outcome.DISAGREES
        return outcome


def agreement(task, profile: str, batch: Sequence) -> float:
    """How well `profile` predicts the real answers of `batch`, from its typed preferences alone."""
    if not batch:
        return 0.0
    return sum(task.prior(profile, ex.query).get(str(ex.answer), 0.0) for ex in batch) / len(batch)


ACCEPTANCE = {"strict": StrictImprovement, "paper": AcceptValid, "agreement": TieBreakByAgreement,
              "consistent": ConsistentImprovement}
