"""LaMP task definitions: label sets, input parsing, answer normalisation and official metrics.

A `Task` knows everything task-specific so the rest of the pipeline never branches on task names:
how to phrase a history item as a query, what text of it to index in memory, which label a raw
model answer means, and how to score a list of answers.
"""

from __future__ import annotations

import functools
import math
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Annotated, Callable, Literal, Sequence

from pydantic import Field
from pydantic_core import core_schema

TAGS_2M = (
    "sci-fi", "based on a book", "comedy", "action", "twist ending", "dystopia", "dark comedy",
    "classic", "psychology", "fantasy", "romance", "thought-provoking", "social commentary",
    "violence", "true story",
)
CATEGORIES_2N = (
    "travel", "education", "parents", "style & beauty", "entertainment", "food & drink",
    "science & technology", "business", "sports", "healthy living", "women", "politics", "crime",
    "culture & arts", "religion",
)


Interaction = tuple[str, str, str, tuple[str, ...]]  # (item id, query, answer, ids hidden while replayed)


class TaskDataError(ValueError):
    """Input that does not fit the task (unknown label, missing field, unparseable input)."""


@dataclass(frozen=True)
class Task:
    key: str
    name: str
    kind: Literal["classification", "rating"]
    labels: tuple[str, ...]
    description: str
    # Profile item -> (text to index and show, the user's own response or None when unlabelled).
    item_text: Callable[[dict], str]
    item_response: Callable[[dict], str | None]
    # Profile item text -> the query the task would have asked about it.
    make_input: Callable[[str, Sequence[str]], str]
    # Regex capturing the item content of a query (what memory search should look for).
    content_pattern: str
    # Regex capturing the label list spelled inside a query, if the task spells one.
    labels_pattern: str | None = None
    aliases: dict[str, str] = field(default_factory=dict, hash=False)  # hashable: tasks key caches
    # For a task whose history items carry no response (LaMP-1): past interactions built from the
    # user's own items, (item id, text) in time order -> (item id, query, the answer they imply,
    # the ids of the items a replay must not find in memory: the one asked about and any it quotes).
    derive_interactions: Callable[["Task", Sequence[tuple[str, str]]], list[Interaction]] | None = \
        field(default=None, hash=False)
    # The typed part of a profile: what a user's preference is, in this task's terms. "labels":
    # the task's labels the user gives most, strongest first; "tendency": how the user's ratings
    # lean (one of TENDENCIES); "topics": a few short topic phrases. `preference_lead` introduces
    # it in the profile text ("<lead>: a, b." for a list, "<lead> <tendency>." for a tendency).
    preference_kind: Literal["labels", "tendency", "topics"] = "labels"
    preference_lead: str = "Labels this user gives most, strongest first"
    # Regex of the candidates a query offers, (label, text) per match, for a task that offers
    # them (LaMP-1's two references).
    candidates_pattern: str | None = None
    # For a task whose items can name what they support (LaMP-2): how a plain few-shot completion
    # reads an item, with no user's data and no instruction: (the item's field, the answer's name,
    # a sentence naming one label). See `reading`.
    reading_form: tuple[str, str, str] | None = None

    # -- inputs -------------------------------------------------------------------------------
    def parse_labels(self, query: str) -> tuple[str, ...]:
        """The label list as the query spells it (order varies between releases); checked
        against the task's fixed set so an unknown label fails loudly, not silently."""
        if self.labels_pattern is None:
            return self.labels
        m = re.search(self.labels_pattern, query, flags=re.S)
        if not m:
            return self.labels
        found = tuple(s.strip() for s in m.group(1).split(",") if s.strip())
        # "style & beauty" etc. never contain commas, so a plain split is exact.
        unknown = [s for s in found if s.lower() not in self.labels]
        if unknown:
            raise TaskDataError(f"{self.name}: unknown labels {unknown} in query (known: {list(self.labels)})")
        return tuple(s.lower() for s in found)

    def content_free(self, query: str) -> str:
        """The query with its item's content replaced by "N/A": what a model answers from the
        request's form alone (its bias towards some labels), to calibrate against."""
        m = re.search(self.content_pattern, query, flags=re.S)
        return query[:m.start(1)] + "N/A" + query[m.end(1):] if m else query

    def query_content(self, query: str) -> str:
        """The part of a query that describes the item, for retrieval."""
        m = re.search(self.content_pattern, query, flags=re.S)
        return (m.group(1) if m else query).strip()

    def reading(self, query: str) -> tuple[str, str]:
        """A completion prompt in which the LM says which labels the item of `query` supports,
        and the answer's prefix to score the labels after (each follows it after one space):

            description: A movie that is sci-fi.
            tag: sci-fi
            ...                           (three demos, each naming one label, made up)
            description: <the item>
            tag:

        No instruction, no label list, no user: what the item says, not what anyone prefers. A
        small base model completes this pattern far more faithfully than it follows a request
        (its top label is one the item supports where the request's is often not)."""
        field_, noun, sentence = self.reading_form
        picks = (self.labels[1], self.labels[len(self.labels) // 2], self.labels[-3])
        demos = "\n".join(f"{field_}: {sentence.format(label=label)}\n{noun}: {label}" for label in picks)
        return f"{demos}\n{field_}: {self.query_content(query)}", f"\n{noun}:"

    def interactions(self, items: Sequence[tuple[str, str, str | None]]) -> list[Interaction]:
        """The past interactions alignment, ICL and GEPA replay, oldest first, as (item id, query,
        the user's answer, the item ids hidden from memory while it is replayed), from history
        items (item id, text, the user's response or None): the labelled items themselves, or for
        a task without responses what `derive_interactions` builds from the user's own items."""
        labelled = [(i, self.make_input(t, self.labels), r, (i,)) for i, t, r in items if r is not None]
        if labelled or self.derive_interactions is None:
            return labelled
        return self.derive_interactions(self, [(i, t) for i, t, _ in items])

    def answer_type(self) -> object:
        """The type of an answer: one of the labels. A rating is read as LaMP reads it, so 4, "4.0"
        and " 4 " are all "4" (a whole number from 1 to 5); anything else fails to parse."""
        return _rating_type(self.labels) if self.kind == "rating" else Literal[self.labels]

    # -- profiles ------------------------------------------------------------------------------
    def preference_type(self, supported: Sequence[str] | None = None) -> object:
        """The type of the profile's `preferences` field: under a JSON-schema grammar a small model
        can only name real labels (or a real tendency), and a strong one is held to the same.
        `supported`: the only values the evidence allows (see `supported_preferences`)."""
        if self.preference_kind == "topics":
            return Annotated[list[Annotated[str, Field(max_length=40)]], Field(min_length=1, max_length=3)]
        values = tuple(supported) if supported else TENDENCIES if self.preference_kind == "tendency" else self.labels
        if self.preference_kind == "tendency":
            return Literal[values]
        return Annotated[list[Literal[values]], Field(min_length=1, max_length=3)]

    def supported_preferences(self, items: Sequence[tuple[str, str | None]]) -> tuple[str, ...] | None:
        """The preferences a history can support: labels the user gave at least once, or the
        tendencies their scores do not contradict (None: no limit). A profile claiming a label
        the user never chose is no description of them."""
        responses = [r for _, r in items if r is not None]
        if not responses or self.preference_kind == "topics":
            return None
        if self.preference_kind == "tendency":
            mean = sum(int(r) for r in responses) / len(responses)
            return (TENDENCIES[1], TENDENCIES[2]) if mean > 3.25 else (TENDENCIES[0], TENDENCIES[1]) if mean < 2.75 \
                else TENDENCIES
        return tuple(label for label in self.labels if label in set(responses))

    def facts(self, items: Sequence[tuple[str, str | None]], by_choice: bool = False) -> str:
        """Counts computed from history items (text, the user's response or None), for the profile
        writer: what a small model cannot count for itself. `by_choice`: where the items' texts
        name the labels they fit, the labels in the order of the user's choices between them
        (`choice_order`) instead of by how often they were given (texts that are whole requests
        name every label in their label list: no choice)."""
        responses = [r for _, r in items if r is not None]
        if self.preference_kind == "tendency" and responses:
            scores = [int(r) for r in responses]
            mean = sum(scores) / len(scores)
            side, lean = (("above", TENDENCIES[2]) if mean > 3.25 else ("below", TENDENCIES[0]) if mean < 2.75
                          else ("near", TENDENCIES[1]))
            counts = ", ".join(f"{k} given {n} times" for k, n in sorted(Counter(scores).items(), reverse=True))
            return (f"their scores: {counts}; mean {mean:.1f}, {side} the middle of the scale (3), which suggests "
                    f"they score {lean}")
        if self.preference_kind == "labels" and responses:
            if by_choice and (order := self.choice_order(items)):
                return ("labels they chose over the others an item named, strongest first: "
                        + ", ".join(f"{label} ({chosen} of {named} times)" for label, chosen, named in order[:6]))
            top = Counter(responses).most_common(6)
            return "labels they gave, most often first: " + ", ".join(f"{label} ({n} times)" for label, n in top)
        words = Counter(w for text, _ in items for w in re.findall(r"[a-z]{4,}", text.lower()) if w not in _STOP)
        return "words most frequent in their items: " + ", ".join(f"{w} ({n})" for w, n in words.most_common(8))

    def choice_order(self, items: Sequence[tuple[str, str | None]]) -> list[tuple[str, int, int]]:
        """The user's labels by how often they chose each where an item named it beside another
        label: [(label, times chosen, times named beside another)], strongest first; [] where too
        few items name labels for that to say anything (under a third of the answered ones).

        How often a label is given is the wrong order where every item fits several labels: the
        user's first label is given only when an item fits it, so a label ranked lower that items
        fit often is given more. A choice between labels the item itself names is a comparison
        (the user ranked the chosen one above the others), and the share of them a label wins
        orders the labels as the user does. Reading what an item supports costs an LM call per
        item (`reading`); an item's own words naming the task's labels cost nothing, and where
        items do not name them (most real data, the paraphrased sets) the counts stay."""
        if self.preference_kind != "labels":  # a rating or a reference is no choice among named labels
            return []
        chosen, named = Counter(), Counter()
        answered = [(text, r) for text, r in items if r is not None]
        for text, response in answered:
            names = named_labels(self.labels, text.lower())
            if response in names and len(names) >= 2:
                chosen[response] += 1
                named.update(names)
        if not answered or sum(chosen.values()) * 3 < len(answered):
            return []
        # the share chosen, smoothed towards a half (a label named once is no strong evidence)
        share = {label: (chosen[label] + 1) / (n + 2) for label, n in named.items()}
        ranked = sorted(named, key=lambda label: (-share[label], -chosen[label], self.labels.index(label)))
        return [(label, chosen[label], named[label]) for label in ranked if chosen[label]]

    def profile_examples(self, supported: Sequence[str] | None = None) -> list[tuple[str, object, str]]:
        """Two worked examples of (facts, preferences, notes), made up from the task's own labels
        and fact format (no user's data): they show a profile writer, a small base model above
        all, how facts turn into a profile. Their labels are ones outside `supported`, so a
        writer that copies an example instead of reading the facts cannot name them."""
        if self.preference_kind == "tendency":
            return [(self.facts([("", s) for s in "5545443555"]), TENDENCIES[2], "Gives a 5 to reviews that read as a 4."),
                    (self.facts([("", s) for s in "2123121321"]), TENDENCIES[0], "Gives a 2 to reviews that read as a 3.")]
        if self.preference_kind == "topics":
            return [(self.facts([("Graph coloring with approximation algorithms", None)] * 3),
                     ["graph coloring", "approximation algorithms"], "Cites theory papers on graph problems."),
                    (self.facts([("Robot grasping and motion planning", None)] * 3),
                     ["robot grasping", "motion planning"], "Cites robotics papers on manipulation.")]
        spare = [label for label in self.labels if label not in set(supported or ())]
        a, b, c, d = spare[:4] if len(spare) >= 4 else (self.labels[3], self.labels[7], self.labels[1], self.labels[5])
        return [(self.facts([("", a)] * 6 + [("", b)] * 4 + [("", c)] * 2), [a, b, c], f"Gives {a} when it fits, then {b}."),
                (self.facts([("", d)] * 5 + [("", a)] * 3 + [("", b)]), [d, a, b], f"Picks {d} over {a} when both fit.")]

    def prior(self, profile: str, query: str) -> dict[str, float]:
        """What a profile says about the answer to `query`, as a weight in [-1, 1] per label (a
        label left out: 0, no preference). An answer step adds these, scaled, to the LM's log-
        probabilities: the profile is evidence, the item decides between what the profile allows.

        labels: the labels the profile names, by order of first mention (the typed part leads:
        strongest first), from 1 for the first down towards 0. tendency: the rating tendency it
        names tilts the scale, +1 at 5 for a generous scorer, -1 at 5 for a harsh one. topics: a
        candidate the query offers (`candidates_pattern`) by the share of the profile's topic
        words its text shares. An empty profile says nothing: {} for every query."""
        low = profile.lower()
        if self.preference_kind == "tendency":
            lean = next((i for i, t in enumerate(TENDENCIES) if t in low), 1) - 1  # -1 harsh, 0, +1 generous
            return {label: lean * (int(label) - 3) / 2 for label in self.labels} if lean else {}
        if self.preference_kind == "topics":
            topic_words = _words(profile)
            if not topic_words or not self.candidates_pattern:
                return {}
            shared = {label: len(_words(text) & topic_words) / len(topic_words)
                      for label, text in re.findall(self.candidates_pattern, query)}
            top = max(shared.values(), default=0)
            return {label: share / top for label, share in shared.items()} if top else {}
        first = label_mentions(self.labels, low)
        ranked = sorted(first, key=first.get)
        return {label: 1 - rank / len(ranked) for rank, label in enumerate(ranked)}

    def names_preference(self, text: str) -> bool:
        """Whether a profile speaks in this task's terms: names one of its labels, a rating
        tendency, or (for topics) says something of at least two content words."""
        low = text.lower()
        if self.preference_kind == "tendency":
            return any(t in low for t in TENDENCIES) or re.search(_RATING_TERMS, low) is not None
        if self.preference_kind == "topics":
            return len([w for w in re.findall(r"[a-z]{4,}", low) if w not in _STOP]) >= 2
        return any(_names(label, low) for label in self.labels)

    # -- outputs ------------------------------------------------------------------------------
    def normalize(self, answer: object) -> str | None:
        """Map a raw model answer to a label, or None when it names none (counted as wrong)."""
        if answer is None:
            return None
        text = str(answer).strip().lower().strip(" \t\n\"'`.:;!")
        if text in self.labels:
            return text
        if text in self.aliases:
            return self.aliases[text]
        if self.kind == "rating":
            rating = read_rating(text)
            if rating is not None:
                return rating
            m = re.search(r"(?<![\d.])[1-5](?![\d.])", text)  # "4 stars"; never the 1 of "10"
            return m.group(0) if m else None
        hits = [label for label in self.labels if _names(label, text)]
        # "dark comedy" also contains "comedy": the longer label is the one named.
        hits = [h for h in hits if not any(h != o and h in o for o in hits)]
        return hits[0] if len(hits) == 1 else None

    def check_gold(self, gold: object, where: str) -> str:
        label = self.normalize(gold)
        if label is None or label != str(gold).strip().lower():
            raise TaskDataError(f"{where}: gold {gold!r} is not a {self.name} label {list(self.labels)}")
        return label

    def official(self, answer: object) -> str | float | None:
        """An answer as LaMP's own scorer reads it, or None where that scorer counts it invalid:
        the exact label after stripping white space (classification), or any number (ratings:
        "4.5" is 4.5 and "10" is 10, as LaMP scores them)."""
        if answer is None:
            return None
        text = str(answer).strip()
        if self.kind == "rating":
            try:
                value = float(text)
            except ValueError:
                return None
            return value if math.isfinite(value) else None
        return text if text in self.labels else None

    def invalid(self, answers: Sequence[object]) -> int:
        """How many answers LaMP's scorer would count invalid."""
        return sum(self.official(a) is None for a in answers)

    # -- metrics ------------------------------------------------------------------------------
    def score(self, golds: Sequence[str], answers: Sequence[object], lenient: bool = False) -> dict[str, float]:
        """LaMP's metrics over raw answers, read as LaMP's scorer reads them (`official`);
        `lenient`: read with `normalize` instead (a label named inside a sentence counts)."""
        if len(golds) != len(answers):
            raise ValueError(f"{len(golds)} golds but {len(answers)} answers")
        if not golds:
            return {}
        read = self.normalize if lenient else self.official
        preds = [read(a) for a in answers]
        if self.kind == "rating":
            return rating_metrics([int(g) for g in golds], [None if p is None else float(p) for p in preds])
        return classification_metrics(list(golds), preds, self.labels)

    def errors(self, golds: Sequence[str], answers: Sequence[object]) -> list[float]:
        """Per-answer loss under the official reading: 0/1 for a wrong label, the absolute error
        for a rating (an invalid one: the farther of 1 and 5). What bootstrap intervals resample."""
        if self.kind == "rating":
            return [_rating_error(int(g), self.official(a)) for g, a in zip(golds, answers)]
        return [float(self.official(a) != g) for g, a in zip(golds, answers)]

    @property
    def metric_names(self) -> tuple[str, str]:
        return ("mae", "rmse") if self.kind == "rating" else ("accuracy", "f1")

    @property
    def higher_is_better(self) -> bool:
        return self.kind != "rating"

    def example_score(self, gold: str, answer: object) -> float:
        """Per-example score in [0, 1], higher is better: exact match, or 1 - |error| / 4."""
        pred = self.normalize(answer)
        if self.kind == "rating":
            g = int(gold)
            err = abs(g - int(pred)) if pred is not None else max(abs(g - 1), abs(g - 5))
            return 1.0 - err / 4.0
        return float(pred == gold)


TENDENCIES = ("harsher than the review reads", "as the review reads", "more generously than the review reads")
_RATING_TERMS = r"\b(harsh\w*|generous\w*|strict\w*|lenient\w*|critical|rates? (high|low)\w*|(high|low)(er)? (scores?|ratings?))\b"
_STOP = frozenset("about after also among between could from have into like more most other over such than that their "
                  "them then there these they this those through under very what when which while will with would your "
                  "paper papers study using based approach method methods".split())


def read_rating(value: object) -> str | None:
    """A number that is a whole rating from 1 to 5 ("4", "4.0", 4, 4.0) as its label, else None."""
    if isinstance(value, bool):
        return None
    try:
        number = float(str(value).strip())
    except ValueError:
        return None
    return str(int(number)) if number.is_integer() and 1 <= number <= 5 else None


@functools.cache
def _rating_type(labels: tuple[str, ...]) -> type:
    """A rating label as a type: the labels' enum in its JSON schema (what a grammar allows), and
    numbers read as whole ratings before the check. A class, not `Annotated[Literal, validator]`:
    DSPy keeps an output field's `Annotated` metadata apart and would parse with the bare Literal."""

    class Rating(str):
        @classmethod
        def __get_pydantic_core_schema__(cls, source, handler):
            return core_schema.no_info_before_validator_function(
                lambda v: read_rating(v) or v, core_schema.literal_schema(list(labels)))

        @classmethod
        def __get_pydantic_json_schema__(cls, schema, handler):
            return {"type": "string", "enum": list(labels)}

    return Rating


def classification_metrics(golds: Sequence[str], preds: Sequence[str | None], labels: Sequence[str]) -> dict:
    """Accuracy and macro-F1 over the fixed label list (as LaMP's evaluation does: every label in
    the list counts, an undefined F1 is 0, an out-of-set prediction matches nothing)."""
    acc = sum(p == g for g, p in zip(golds, preds)) / len(golds)
    f1s = []
    for label in labels:
        tp = sum(g == label and p == label for g, p in zip(golds, preds))
        fp = sum(g != label and p == label for g, p in zip(golds, preds))
        fn = sum(g == label and p != label for g, p in zip(golds, preds))
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return {"accuracy": acc, "f1": sum(f1s) / len(f1s)}


def rating_metrics(golds: Sequence[int], preds: Sequence[float | None]) -> dict:
    """MAE and RMSE; an unparseable prediction counts as whichever of 1 and 5 is farther (as
    LaMP's scorer does)."""
    errs = [_rating_error(g, p) for g, p in zip(golds, preds)]
    return {"mae": sum(errs) / len(errs), "rmse": math.sqrt(sum(e * e for e in errs) / len(errs))}


def _rating_error(gold: int, pred: float | None) -> float:
    return float(abs(gold - pred)) if pred is not None else float(max(abs(gold - 1), abs(gold - 5)))


def _names(label: str, text: str) -> bool:
    """Whether lower-cased `text` names `label` as a whole term ("sci-fi" is not in "sci-fis")."""
    return re.search(rf"(?<![\w-]){re.escape(label)}(?![\w-])", text) is not None


def label_mentions(labels: Sequence[str], text: str) -> dict[str, int]:
    """Where lower-cased `text` first names each label it names: longer names first, each then
    blanked to as many "#", so "dark comedy" names dark comedy, not also comedy, and positions
    stay where they were."""
    first = {}
    for label in sorted(labels, key=len, reverse=True):
        pattern = rf"(?<![\w-]){re.escape(label)}(?![\w-])"
        if m := re.search(pattern, text):
            first[label] = m.start()
            text = re.sub(pattern, lambda m: "#" * len(m.group()), text)
    return first


def named_labels(labels: Sequence[str], text: str) -> list[str]:
    """The labels lower-cased `text` names, each once (`label_mentions`), longer names first."""
    return list(label_mentions(labels, text))


def _bracketed(labels: Sequence[str]) -> str:
    return "[" + ", ".join(labels) + "]"


# Topics of computing research (public, made up here, no user's data): a LaMP-1 interaction built
# from a user's own papers pairs their earlier paper with a distractor written from two of these,
# drawn per interaction among those that share no word with anything the user wrote. A fixed
# distractor (or one from a far-off field) would make every replay the same easy question.
DISTRACTOR_TOPICS = (
    "compiler optimization", "cache coherence", "congestion control", "program synthesis", "type inference",
    "garbage collection", "wireless scheduling", "peer-to-peer overlays", "energy harvesting", "quantum error correction",
    "recommender systems", "federated learning", "genome assembly", "computational geometry", "formal verification",
    "regression testing", "haptic interfaces", "photorealistic rendering", "speech recognition", "reward shaping",
    "edge offloading", "blockchain consensus", "virtual reality", "kernel scheduling", "clone detection",
    "online tutoring", "community detection", "sparse solvers", "GPU kernels", "datacenter cooling",
    "mesh generation", "packet classification", "web crawling", "spreadsheet errors", "smart contracts",
    "protein docking", "traffic forecasting", "accessibility audits", "code review", "satellite imagery",
)
DISTRACTOR_FORMS = ("{a} with {b}", "Revisiting {a} for {b}", "{a} meets {b}", "Efficient {a} under {b}",
                    "On {a} and {b}", "A study of {a} in {b}")


def _words(text: str) -> set[str]:
    return {w for w in re.findall(r"[a-z]+", text.lower()) if len(w) > 3}


def _citations_from_own_papers(task: "Task", papers: Sequence[tuple[str, str]]) -> list[Interaction]:
    """LaMP-1 interactions from a user's own papers (their history has no citation decisions).

    For each paper P (after the first): the request LaMP-1 would ask about P's title, with two
    candidate references: the user's own earlier paper E closest to P in wording (the kind of
    work this author cites) and a distractor title drawn for this interaction from public topics
    that share no word with anything the user wrote. The gold is E; its position alternates.
    While the interaction is replayed, P and E are both hidden from memory: E in memory would
    answer the question by itself. Only the user's own items and fixed public text are used: no
    other user's data (another author's paper as the distractor would put their data in this
    user's prompts), no test item."""
    own_words = set().union(*(_words(text) for _, text in papers)) if papers else set()
    topics = [t for t in DISTRACTOR_TOPICS if not _words(t) & own_words] or list(DISTRACTOR_TOPICS)
    out = []
    for n, (item_id, text) in enumerate(papers):
        earlier = papers[:n]
        if not earlier:
            continue
        title = text.split(". ")[0]
        words = _words(text)
        cited_id, cited = max(earlier, key=lambda p: len(words & _words(p[1])))
        rng = random.Random(f"lamp1-distractor|{item_id}")
        a, b = rng.sample(topics, 2)
        other = rng.choice(DISTRACTOR_FORMS).format(a=a, b=b)
        own = cited.split(". ")[0]
        refs, gold = ((own, other), "[1]") if n % 2 else ((other, own), "[2]")
        query = task.make_input(title, task.labels) + f' [1]: "{refs[0]}" [2]: "{refs[1]}"'
        out.append((item_id, query, gold, (item_id, cited_id)))
    return out


LAMP_1 = Task(
    key="lamp1", name="LaMP-1", kind="classification", labels=("[1]", "[2]"),
    description="citation identification: which of two references the author would cite",
    item_text=lambda it: f'{it["title"]}. {it.get("abstract", "")}'.strip(),
    item_response=lambda it: None,  # profile papers carry no decision
    make_input=lambda text, labels: (
        f'For an author who has written the paper with the title "{text}", which reference is related? '
        "Just answer with [1] or [2] without any other explanation."),
    content_pattern=r"title \"(.*?)\", which reference",
    aliases={"1": "[1]", "2": "[2]", "reference 1": "[1]", "reference 2": "[2]"},
    derive_interactions=_citations_from_own_papers,
    preference_kind="topics", preference_lead="Research topics this author works on and cites",
    candidates_pattern=r'(\[\d\]): "(.*?)"',
)
LAMP_2M = Task(
    key="lamp2m", name="LaMP-2M", kind="classification", labels=TAGS_2M,
    description="movie tagging: the one tag this user would give the movie",
    item_text=lambda it: it["description"], item_response=lambda it: it["tag"],
    make_input=lambda text, labels: (
        "Which tag does this movie relate to among the following tags? Just answer with the tag name "
        f"without further explanation. tags: {_bracketed(labels)} description: {text}"),
    content_pattern=r"description:\s*(.*)$", labels_pattern=r"tags:\s*\[(.*?)\]",
    preference_lead="Tags this user gives most, strongest first",
    reading_form=("description", "tag", "A movie that is {label}."),
)
LAMP_2N = Task(
    key="lamp2n", name="LaMP-2N", kind="classification", labels=CATEGORIES_2N,
    description="news categorization: the category this journalist would file the article under",
    item_text=lambda it: f'{it.get("title", "")}. {it["text"]}'.strip(". "),
    item_response=lambda it: it["category"],
    make_input=lambda text, labels: (
        "Which category does this article relate to among the following categories? Just answer with "
        f"the category name without further explanation. categories: {_bracketed(labels)} article: {text}"),
    content_pattern=r"article:\s*(.*)$", labels_pattern=r"categories:\s*\[(.*?)\]",
    preference_lead="Categories this journalist files under most, strongest first",
    reading_form=("article", "category", "An article that is {label}."),
)
LAMP_3 = Task(
    key="lamp3", name="LaMP-3", kind="rating", labels=("1", "2", "3", "4", "5"),
    description="product rating: the 1-5 score this user would give the review",
    item_text=lambda it: it["text"], item_response=lambda it: str(it["score"]),
    make_input=lambda text, labels: (
        "What is the score of the following review on a scale of 1 to 5? just answer with 1, 2, 3, 4, "
        f"or 5 without further explanation. review: {text}"),
    content_pattern=r"review:\s*(.*)$",
    preference_kind="tendency", preference_lead="This user scores",
)

TASKS: dict[str, Task] = {t.key: t for t in (LAMP_1, LAMP_2M, LAMP_2N, LAMP_3)}
_SPELLINGS = {"lamp_1": "lamp1", "lamp_2": "lamp2m", "lamp2": "lamp2m", "lamp_2m": "lamp2m",
              "lamp_2n": "lamp2n", "lamp_3": "lamp3"}


def get_task(name: str) -> Task:
    """Look a task up by any usual spelling: 'lamp2m', 'LaMP-2M', 'LaMP_2'."""
    key = re.sub(r"[^a-z0-9_]", "", name.lower().replace("-", "_"))
    key = _SPELLINGS.get(key, key.replace("_", ""))
    if key not in TASKS:
        raise TaskDataError(f"unknown task {name!r}; choose from {sorted(TASKS)}")
    return TASKS[key]
