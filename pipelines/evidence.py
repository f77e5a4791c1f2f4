"""The answer step in which the persona is evidence.

The LM reads the request, the user's retrieved interactions and the agent's trajectory under the
shared task instruction, and gives the log-probability of each label that can start its answer.
How the persona's typed preferences (`Task.prior`) weigh in depends on what they are:

- a ranking of labels, for a task that reads its items (LaMP-2, `Task.reading`): a second call
  reads the item alone, as a plain few-shot completion with no user and no instruction, and the
  labels within `margin` nats of its best are those the item supports; the user's first preferred
  label among them is the answer, else the LM's most likely one among them (`first_supported`).
  The answer's own distribution is not the support: a small model peaks it on whatever label the
  item names first, and a persona weighed against that peak loses exactly where it should win;
- otherwise, calibrated against the same request with its item blanked (the LM's bias towards a
  label whatever the item), scaled by `strength`:

    evidence(label) = log p_LM(label | item, history) - log p_LM(label | blanked item, history)
    score = first_fit(evidence, ranking)       a list of preferred labels: the first that fits
          | evidence + strength * prior        a tendency or topics (`add_prior`)

The answer is the best score. The LM's part does not depend on the persona, so every candidate
persona of an alignment is scored on the same LM calls (DSPy's cache serves them after the
first), and an empty profile (prior {}) answers exactly as no persona does.

The labels are scored in one call that continues the answer's prefix (`{"answer": "`, plus what
every label starts with) for one token and reads the alternatives the LM gives there, each label
by the way the LM spells it; labels that still share that token are told apart by one more call
each level down. An LM that cannot score (no log-probabilities, or no continuation of a prefix)
answers by prompting, with the persona in the instruction: the paper's agent, and what
`answer_step="prompt"` asks for.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Callable

import dspy
from dspy.lm15 import Config, Message, Request
from dspy.utils.exceptions import AdapterParseError

from persona_agent import overrides

log = logging.getLogger(__name__)

ANSWER_STEPS = ("evidence", "prompt")
TOP = 1000  # alternatives asked for per scored token (llama.cpp: ~50 ms); a label none of them starts is implausible


def scoring_unsupported(lm, adapter) -> str | None:
    """Why `lm` under `adapter` cannot score labels, or None when it can."""
    engine = overrides.engine_of(lm) if lm is not None else None
    if engine is None or "logprobs" not in getattr(engine, "supported_params", ()):
        return "the LM gives no log-probabilities"
    if not getattr(engine, "continues_prefill", False):
        return "the LM does not continue an answer's prefix"
    if not hasattr(adapter, "answer_prefix"):
        return f"{type(adapter).__name__} has no answer prefix"
    return None


class EvidenceAnswer(dspy.Module):
    """Answers `signature` (one string output field typed to the task's labels) by label scores
    plus the prior `prior(inputs) -> {label: weight}`; falls back to `dspy.Predict(signature)`
    where the LM cannot score (logged once per reason)."""

    def __init__(self, signature: type[dspy.Signature], labels: tuple[str, ...],
                 prior: Callable[[dict], dict[str, float]], *, strength: float,
                 content_free: Callable[[str], str] | None = None,
                 combine: Callable[[dict, dict, float], dict[str, float]] | None = None,
                 reading: Callable[[str], tuple[str, str]] | None = None, margin: float = 3.5):
        """content_free: the query with its item blanked out (`Task.content_free`); given, each
        label's log-probability is taken relative to its log-probability on that blanked request
        (the LM's bias towards a label whatever the item, which a small model has plenty of).
        combine(evidence, prior, strength) -> scores: how the prior weighs in (`add_prior`, the
        default, or `first_fit`). reading: query -> (a completion prompt, the prefix its label
        follows) that reads which labels the item supports (`Task.reading`); given, the answer is
        `first_supported` with the labels within `margin` nats of the reading's best, and
        neither `content_free` nor `combine` is used."""
        super().__init__()
        self.predict = dspy.Predict(signature)  # the prompt, its demos, and the fallback
        self.labels, self.prior, self.strength, self.content_free = labels, prior, strength, content_free
        self.combine = combine or add_prior
        self.reading, self.margin = reading, margin
        self.exact = False  # True: score every label to its distinct token, not only until the winner is sure
        self.field = next(iter(signature.output_fields))

    def forward(self, **inputs) -> dspy.Prediction:
        lm, adapter = dspy.settings.lm, dspy.settings.adapter
        if (why := scoring_unsupported(lm, adapter)) is not None:
            note_prompting(why)
            return self.predict(**inputs)
        demos = inputs.pop("demos", None)
        demos = self.predict.demos if demos is None else demos
        signature = self.predict.signature
        prefix = adapter.answer_prefix(self.field)
        prior = self.prior(inputs) if self.strength else {}
        bias = support = None
        try:
            if self.reading is not None:
                text, reading_prefix = self.reading(inputs["query"])
                support = label_logprobs(lm, [{"role": "user", "content": text}], reading_prefix, labels=self.labels,
                                         expand="all", missing=-math.inf, lead=" ", within=self.margin)
                if all(v == -math.inf for v in support.values()):
                    raise NoScores("no label is among the LM's alternatives when it reads the item")
            elif self.content_free is not None:
                # one call: the bias is an estimate anyway, and labels sharing a token share it
                blank = {**inputs, "query": self.content_free(inputs["query"])}
                # (a label no alternative starts counts at the last alternative's log-probability: an
                # upper bound, so its bias is never overstated)
                bias = label_logprobs(lm, adapter.format(signature, demos, blank), prefix, labels=self.labels,
                                      expand="none")

            def scores(logp: dict[str, float]) -> dict[str, float]:
                if support is not None:
                    return first_supported(logp, prior, supported(support, self.margin))
                item = {label: logp[label] - (bias[label] if bias else 0.0) for label in self.labels}
                return self.combine(item, prior, self.strength)

            # for the item itself a label no alternative starts is implausible: no prior may make it the answer
            logp = label_logprobs(lm, adapter.format(signature, demos, inputs), prefix, labels=self.labels,
                                  winner=lambda logp: _best(self.labels, scores(logp), logp),
                                  expand="all" if self.exact else "winner", missing=-math.inf)
            if all(v == -math.inf for v in logp.values()):
                raise NoScores("no label is among the LM's alternatives")
        except NoScores as err:  # an answer that arrived and cannot be read: a parse failure, never an LM error
            raise AdapterParseError(type(self).__name__, signature, "", str(err)) from None
        final = scores(logp)
        return dspy.Prediction(**{self.field: _best(self.labels, final, logp)}, scores=final, logprobs=logp, bias=bias,
                               support=support)


def _best(labels: tuple[str, ...], scores: dict[str, float], logp: dict[str, float]) -> str:
    """The best score; ties go to the LM's own preference, then to the task's label order."""
    return max(labels, key=lambda label: (scores[label], logp[label]))


def supported(reading: dict[str, float], margin: float) -> tuple[str, ...]:
    """The labels an item supports: those the reading scores within `margin` nats of its best."""
    top = max(reading.values())
    return tuple(label for label, lp in reading.items() if lp > -math.inf and lp >= top - margin)


def first_supported(item: dict[str, float], prior: dict[str, float], support: tuple[str, ...]) -> dict[str, float]:
    """The user's first preferred label among those the item supports; where they prefer none
    of them, the one the LM answers most likely (`item`: its log-probabilities, with the
    user's retrieved interactions as demos).

    The support comes from reading the item alone, not from how likely the LM makes each label
    as an answer: that distribution is peaked on whatever the item names first (a small model's
    position bias), so weighing the persona against it lets the peak outvote the user's order.
    Inside the support the persona decides; outside it the persona cannot reach. Returned as
    scores whose best is the answer: a preferred supported label above every other, by rank;
    the other supported labels by the LM's log-probability; the rest -inf. No prior: the LM's
    best supported label, what every persona that prefers none of them answers too."""
    inside = [label for label in support if item.get(label, -math.inf) > -math.inf] or list(support)
    ranking = [label for label in sorted(prior, key=lambda label: -prior[label]) if prior[label] > 0]
    out = {label: -math.inf for label in item}
    for label in inside:
        out[label] = item.get(label, -math.inf) if item.get(label, -math.inf) > -math.inf else -1e9
    preferred = [label for label in ranking if label in inside]
    for rank, label in enumerate(preferred):
        out[label] = float(len(preferred) - rank)  # above any log-probability (<= 0)
    return out


def add_prior(item: dict[str, float], prior: dict[str, float], strength: float) -> dict[str, float]:
    """The prior as log-odds: `strength` nats at most added to the item's evidence. For a
    tendency (ratings) or topics (references), where every label is a matter of degree."""
    return {label: lp + strength * prior.get(label, 0.0) for label, lp in item.items()}


def first_fit(item: dict[str, float], prior: dict[str, float], strength: float) -> dict[str, float]:
    """The prior as a ranking: the user takes the first label in their order that fits the item.

    The LM's (calibrated) label distribution p says how well each label fits; a label fits with
    probability q = min(1, strength * p) (`strength`: about how many labels an item supports),
    and the user's answer is `l` when `l` fits and no label ranked above it does:

        log P(l) = log q(l) + sum over m ranked above l of log(1 - q(m))

    Labels the profile does not rank come after those it does, in the LM's order. Where the item
    supports a preferred label it wins; where it does not, preferences cost nothing: a profile
    naming the user's frequent labels cannot push them onto an item about something else, as an
    additive prior does (docs/evaluation.md measures both). No ranking: the LM's own order."""
    ranking = sorted(prior, key=lambda label: -prior[label])
    if not ranking or strength <= 0:
        return dict(item)
    top = max(item.values())
    if top == -math.inf:
        return dict(item)
    weights = {label: math.exp(lp - top) for label, lp in item.items()}
    total = sum(weights.values())
    q = {label: min(1 - 1e-6, strength * w / total) for label, w in weights.items()}
    out, above = {}, 0.0
    for label in ranking:
        out[label] = _log(q[label]) + above
        above += _log(1 - q[label])
    for label in item:
        if label not in out:
            out[label] = _log(q[label]) + above
    return out


def _log(x: float) -> float:
    return math.log(x) if x > 0 else -math.inf


def label_logprobs(lm: dspy.LM, messages: list[dict], prefix: str, *, labels: tuple[str, ...],
                   winner: Callable[[dict[str, float]], str] | None = None, expand: str = "winner",
                   missing: float | None = None, lead: str = "", within: float = math.inf) -> dict[str, float]:
    """log p(label | messages, prefix) for each label, to the token that tells it from the others.

    Labels that share their next token are told apart by one more call: `expand="winner"` only
    while one of them is what `winner` (default: the most probable) picks from the scores so far
    (a label's log-probability only falls as its tokens are scored), so the answer's score is
    exact and a loser's may be an upper bound; "all": every label's is exact; "none": one call,
    and labels sharing a token share its probability evenly. A label none of the alternatives
    starts scores `missing`, by default the last alternative's log-probability (an upper bound
    on its own). `lead`: what comes before every label after `prefix` (" " after "tag:"), part
    of the label's first token in most tokenizers, so it cannot end the prefix. `within` (with
    "all"): only labels that can still come within that many nats of the best are made exact; a
    group whose shared score is already below is left at it (an upper bound), as no further token
    can raise it: the item reading's support needs one call where the LM spells the unlikely
    labels from a bare " "."""
    winner = winner or (lambda logp: max(labels, key=logp.get))
    out: dict[str, float] = {}
    shared: dict[str, tuple[str, dict[str, str], float]] = {}  # label -> the group's (prefix, rests, log-prob)
    # what every label starts with ("[" of "[1]", "[2]") is part of any answer: it goes into the
    # prefix, and one call tells the labels apart (its probability, the same for all, is left out)
    common = os.path.commonprefix(list(labels)) if len(labels) > 1 and not lead else ""
    if any(len(label) == len(common) for label in labels):
        common = ""
    floors: dict[str, float] = {}  # label -> a path already scored, that an expansion can only better
    _expand(lm, messages, prefix + common, rest={label: lead + label[len(common):] for label in labels}, base=0.0,
            out=out, shared=shared,
            missing=missing, floors=floors)
    while shared:
        if expand == "none":
            return {label: out[label] - (math.log(len(shared[label][1])) if label in shared else 0.0)
                    for label in labels}
        if expand == "all":
            best = max(shared, key=lambda label: shared[label][2])  # the likeliest group first: it can raise the bar
            top = max((lp for label, lp in out.items() if label not in shared), default=-math.inf)
            if shared[best][2] < top - within:
                break
        else:
            best = winner(out)
            if best not in shared:
                break
        group_prefix, rests, lp = shared[best]
        for label in rests:
            del shared[label]
        _expand(lm, messages, group_prefix, rest=rests, base=lp, out=out, shared=shared, missing=missing, floors=floors)
    return out


def _expand(lm, messages, prefix, *, rest: dict[str, str], base: float, out: dict, shared: dict,
            missing: float | None, floors: dict) -> None:
    """One call: score the labels in `rest` (label -> its text still to come after `prefix`) by
    the next token's alternatives; labels left sharing one go to `shared`, at that token's score.

    A label's paths are the alternatives that start it (or end it and close the answer). Its
    longest is how it is spelled when nothing else is more likely; where a shorter one is more
    probable ("d" at -0.07 against "dyst" at -10.7, for a tokenizer that spells "d", "yst",
    "opia"), that one is the LM's own spelling: it is followed one token further, with the
    longest path kept as a floor. A shorter token's probability belongs to every label it starts
    ("c" for "comedy" and "classic"), so such labels are told apart by the next call."""
    alternatives = _next_token(lm, messages, prefix)
    floor = min(alternatives.values(), default=0.0) if missing is None else missing - base
    best: dict[str, tuple[str, float]] = {}
    for label, text in rest.items():
        # "1" for "10" is no spelling of "1": a token longer than the label must close it
        fits = [(tok, lp) for tok, lp in alternatives.items()
                if tok and (text.startswith(tok) or (tok.startswith(text) and not tok[len(text)].isalnum()))]
        if not fits:
            best[label] = ("", floor)
            continue
        longest = max(fits, key=lambda t: (min(len(t[0]), len(text)), t[1]))
        likely = max(fits, key=lambda t: t[1])
        if likely[1] > longest[1]:
            floors[label] = max(floors.get(label, -math.inf), base + longest[1])
            best[label] = likely
        else:
            best[label] = longest
    groups: dict[str, list[str]] = {}
    for label, (tok, _) in best.items():
        groups.setdefault(tok, []).append(label)
    for tok, members in groups.items():
        lp = base + best[members[0]][1]
        if tok and len(members) > 1 and all(len(tok) < len(rest[m]) for m in members):
            for m in members:  # they share this token: the next one would tell them apart
                out[m] = max(lp, floors.get(m, -math.inf))
                shared[m] = (prefix + tok, {m2: rest[m2][len(tok):] for m2 in members}, lp)
        else:  # a label's first distinct token decides; labels that end on a shared one split it
            for m in members:
                out[m] = max(lp - math.log(len(members)) if tok else lp, floors.get(m, -math.inf))


def _next_token(lm: dspy.LM, messages: list[dict], prefix: str) -> dict[str, float]:
    """The LM's next-token alternatives after `messages` and the answer's start `prefix`."""
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system") or None
    turns = [Message.user(m["content"]) if m["role"] == "user" else Message.assistant(m["content"])
             for m in messages if m["role"] != "system"]
    request = Request(model=lm.model, system=system, messages=(*turns, Message.assistant(prefix)),
                      config=Config(max_tokens=1, temperature=0.0, logprobs=TOP))
    response = lm(request)
    steps = response.logprobs or ()
    if not steps:
        raise NoScores("the LM's reply carried no log-probabilities")
    first = steps[0]
    alternatives: dict[str, float] = {}
    for alt in (*first.top, first):
        alternatives[alt.token] = max(alt.logprob, alternatives.get(alt.token, -math.inf))
    return alternatives


class NoScores(ValueError):
    """A reply arrived without the log-probabilities asked for."""


_noted: set[str] = set()


def note_prompting(why: str) -> None:
    """Log, once per reason, that an evidence answer step prompts instead."""
    if why not in _noted:
        _noted.add(why)
        log.warning("answer step: prompting as the paper's agent does, not scoring labels (%s)", why)
