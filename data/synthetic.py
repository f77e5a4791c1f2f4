"""Generate LaMP-format data where personalization is measurable.

Every synthetic user has a latent preference rule that their history reveals, and every item is
ambiguous so that its gold label depends on the user:

- LaMP-2M / LaMP-2N: each item cues 2-3 labels; the user's gold is the cued label that ranks
  highest in the user's private priority order. A non-personalized answer picks among the cued
  labels at chance (~40%).
- LaMP-3: each review has a tone (1-5) that its text alone tells; the user's gold is the tone
  shifted by the user's rating bias (harsh or generous, 1 or 2 points), with tones drawn so the
  shift stays on the scale. A non-personalized answer (the tone) is off by the bias; only the
  bias needs the user.
- LaMP-1: each query's title mixes two research fields; the gold reference is the one in the
  user's own field, which only their paper history shows.

History and queries are written from disjoint halves of every text pool (`half`), so no query
repeats a sentence, a cue phrase or a review body of its user's history: copying a similar past
item's label (`lookup`) must not be what scores. `make-data` prints what that copying rule and
the planted rule score, and refuses a set where copying scores above one half.

Two axes, each a choice of `make-data` (`--drift`, `--level`):

- **stable or drifting users** (`drift`). A drifting user's older history follows rule A; their
  latest `RECENT` interactions (at least twice the alignment batch) and every query follow rule B,
  and every query is built so that A and B answer it differently: LaMP-2, a label A ranks low
  moves to the top; LaMP-3, the rating bias changes sign; LaMP-1, the author's field moves (the
  distractor reference is from the old field). The old rule dominates the whole history's counts,
  as a long history does: a summary of all of it lags behind where the user is now, which their
  latest interactions show. `rules.json` keeps the current rule (B, what the oracle writes), the
  old one and the date of the change.
- **paraphrased or readable items** (`level`). Paraphrased (today's sets): an item describes what
  it supports in phrases the model must understand ("a sorceress and her spellbook" for fantasy),
  which a 270M model mostly cannot. Readable: an item names what it supports in the task's own
  words ("a film that is fantasy and romance", "I would give it 4 out of 5"), so what is left
  between a non-personalized answer and the user's is the user, not the model's reading. History
  and queries still use different sentence forms, and copying (`lookup`) is checked as for the
  other level.

Output is the LaMP layout (`{split}_questions.json` + `{split}_outputs.json`), with a `user_id`
on each question so several queries can share one user, and a `date` on every profile item.
"""

from __future__ import annotations

import json
import math
import random
import re
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path
from typing import Callable

from persona_agent.data.atomic import atomic_write_text
from persona_agent.data.calibration import accuracy, lookup
from persona_agent.data.tasks import CATEGORIES_2N, TAGS_2M, TENDENCIES, Task, named_labels

# Every pool below is split in two by position: history items draw from the even entries, queries
# from the odd ones, so a query shares no sentence, cue phrase or review body with its user's
# history. What carries over is what should: the labels a phrase cues, the tone a review has,
# the field a paper is in, and the user's rule.
CUES_2M = {
    "sci-fi": ["a starship crew", "an alien signal", "a colony on Mars", "a rogue android", "a time machine",
               "first contact with another species"],
    "based on a book": ["adapted from the bestselling novel", "from the beloved book", "the novel's famous chapters",
                        "faithful to the original novel", "the author's celebrated memoir", "a classic novel brought to screen"],
    "comedy": ["a string of hilarious mishaps", "a bumbling best friend", "a wedding gone absurdly wrong",
               "slapstick at a family reunion", "a comic case of mistaken identity", "a prank war between neighbours"],
    "action": ["a high-speed car chase", "an explosive heist", "a rooftop shootout", "a daring prison break",
               "hand-to-hand combat on a train", "a race to defuse a bomb"],
    "twist ending": ["a final reveal that changes everything", "nothing is what it seems", "a shocking last scene",
                     "a last-minute revelation", "an ending that rewrites the story", "a truth hidden until the end"],
    "dystopia": ["a totalitarian future state", "a ruined society under surveillance", "rationed lives after the collapse",
                 "a city ruled by a surveillance regime", "citizens numbered by the state", "the last free town after the fall"],
    "dark comedy": ["a funeral that turns into farce", "gallows humour about a botched crime", "a morbidly funny family feud",
                    "a darkly funny inheritance squabble", "a comic undertaker", "laughs at a crime gone wrong"],
    "classic": ["a timeless black-and-white story", "a golden-age Hollywood epic", "a landmark of early cinema",
                "a restored silent-era masterpiece", "a celebrated studio-era drama", "an enduring film from the 1940s"],
    "psychology": ["a fractured mind", "obsession and memory", "a patient and her therapist", "a descent into paranoia",
                   "a study of split personality", "a mind haunted by trauma"],
    "fantasy": ["a dragon and a cursed kingdom", "a wizard's apprentice", "an enchanted forest", "a quest for a magic sword",
                "elves at war with giants", "a sorceress and her spellbook"],
    "romance": ["two strangers fall in love", "a long-distance love affair", "a second chance at love", "a summer romance",
                "lovers kept apart by their families", "a love letter that arrives years late"],
    "thought-provoking": ["questions about what makes us human", "a moral dilemma with no easy answer", "a meditation on time",
                          "an inquiry into free will", "a puzzle about the meaning of a life", "a reflection on memory and identity"],
    "social commentary": ["inequality in a small town", "a satire of corporate greed", "a community divided by class",
                          "a critique of media power", "workers against a company town", "a portrait of housing injustice"],
    "violence": ["a brutal gang war", "a bloody revenge spree", "savage street fights", "a massacre in a border town",
                 "a vicious cartel feud", "graphic battlefield carnage"],
    "true story": ["the real events of 1972", "the true account of a famous trial", "based on real survivors",
                   "the true story of a record flight", "drawn from a real newspaper investigation", "the real life of a famous boxer"],
}
CUES_2N = {
    "travel": ["hidden beaches of Portugal", "a budget guide to Tokyo", "the best road trips this summer",
               "backpacking through Patagonia", "cheap flights to Iceland", "a weekend in Lisbon"],
    "education": ["public school funding", "new college admission rules", "teachers and classroom technology",
                  "student loan reform", "a shortage of math teachers", "homework policy in middle schools"],
    "parents": ["raising toddlers", "bedtime battles with kids", "parenting teenagers online", "choosing a daycare",
                "screen time for young children", "talking to kids about divorce"],
    "style & beauty": ["spring fashion trends", "a skincare routine", "red carpet looks", "the season's best sneakers",
                       "a hair colour makeover", "vintage denim styling"],
    "entertainment": ["a blockbuster box office weekend", "a celebrity interview", "the new streaming series",
                      "an awards show recap", "a pop star's world tour", "a late-night host's farewell"],
    "food & drink": ["a simple pasta recipe", "craft beer tasting", "a new vegan restaurant", "the perfect sourdough",
                     "natural wine bars", "a street food market"],
    "science & technology": ["a new smartphone chip", "a breakthrough in quantum computing", "a Mars rover discovery",
                             "a battery that charges in minutes", "gene editing in crops", "a new space telescope image"],
    "business": ["quarterly earnings", "a startup raising funds", "a merger between two banks", "a retail chain's bankruptcy",
                 "a CEO stepping down", "interest rates and small firms"],
    "sports": ["the championship final", "a star quarterback's injury", "the marathon record", "a tennis upset at Wimbledon",
               "a transfer deadline deal", "the world cup qualifiers"],
    "healthy living": ["a daily workout plan", "sleep and stress", "mindful eating habits", "a beginner's yoga routine",
                       "walking ten thousand steps", "cutting back on sugar"],
    "women": ["women in leadership", "the gender pay gap", "female founders", "women's health research funding",
              "mothers returning to work", "women in engineering"],
    "politics": ["the senate vote", "a campaign rally", "the new election law", "a governor's veto",
                 "a debate between candidates", "a parliamentary coalition"],
    "crime": ["a bank robbery suspect", "a fraud investigation", "the murder trial verdict", "a stolen art heist",
              "a cybercrime ring", "a cold case reopened"],
    "culture & arts": ["a museum retrospective", "a new opera production", "a poetry festival", "a sculpture biennale",
                       "a theatre revival", "a photography exhibit"],
    "religion": ["a papal visit", "interfaith dialogue", "a pilgrimage to Mecca", "a cathedral restoration",
                 "a monastery's daily life", "a holy day celebration"],
}
# Reviews by the tone they read as (1 = very negative ... 5 = very positive), each sentence with an
# {aspect} slot or none. Many per tone, so what a query says has never been said in its history.
TONES = {
    1: ["It broke within a week.", "Support never answered a single email.", "A complete waste of money.",
        "The {aspect} failed on the first day.", "I returned it immediately.", "Nothing about it works as advertised.",
        "The {aspect} is flimsy and cheap.", "Worst purchase I have made this year.", "It stopped working after two uses.",
        "Do not buy this under any circumstances.", "The {aspect} fell apart in my hands.", "Utterly useless from the start."],
    2: ["It works, barely, and feels cheap.", "Disappointing quality for the price.", "The {aspect} is a letdown.",
        "I expected much more from it.", "It does the job poorly most days.", "The {aspect} wore out far too soon.",
        "Several small flaws add up to frustration.", "Not terrible, but I regret buying it.",
        "The {aspect} feels like an afterthought.", "Below average in nearly every way.",
        "It often needs a second try to work.", "I would not recommend it to a friend."],
    3: ["It is okay and does what it says.", "An average product with some flaws.", "The {aspect} is acceptable, nothing more.",
        "Neither impressive nor bad.", "It gets the basics right and little else.", "The {aspect} is fine for the money.",
        "A middling experience overall.", "Some days it works well, some days less so.", "The {aspect} is ordinary.",
        "Adequate for occasional use.", "It is what you would expect at this price.", "Mixed feelings after a month."],
    4: ["Good product that works well with minor issues.", "Solid and reliable, I am satisfied.", "The {aspect} is well made.",
        "It does its job nicely.", "A few quirks, but I like it a lot.", "The {aspect} holds up well after months of use.",
        "Better than I expected for the money.", "I would happily buy it again.", "The {aspect} is a pleasant surprise.",
        "Dependable and easy to use.", "Almost everything about it is right.", "A good choice with small compromises."],
    5: ["Excellent, it exceeded every expectation.", "Perfect, the best purchase I have made.", "The {aspect} is flawless.",
        "Absolutely superb in every respect.", "I could not be happier with it.", "The {aspect} is simply outstanding.",
        "Works perfectly every single time.", "A brilliant product I recommend to everyone.", "The {aspect} is first class.",
        "Five stars without hesitation.", "It is a joy to use every day.", "Truly exceptional quality throughout."],
}
ASPECTS = ["battery", "handle", "lid", "cable", "strap", "zipper", "screen", "button", "finish", "motor", "hinge", "switch"]
PRODUCTS = ["blender", "headphones", "backpack", "desk lamp", "phone case", "kettle", "keyboard", "tent", "toaster",
            "umbrella", "water bottle", "office chair", "drill", "speaker", "mouse", "suitcase"]
FIELDS = {
    "databases": ["query optimization", "transaction processing", "index structures", "distributed storage",
                  "concurrency control", "data integration", "stream processing", "schema matching"],
    "vision": ["image segmentation", "object detection", "visual tracking", "scene reconstruction",
               "optical flow", "pose estimation", "image captioning", "depth estimation"],
    "nlp": ["machine translation", "language models", "question answering", "text summarization",
            "named entity recognition", "sentiment analysis", "dependency parsing", "dialogue systems"],
    "robotics": ["motion planning", "robot grasping", "legged locomotion", "swarm control",
                 "visual servoing", "mobile manipulation", "robot localization", "trajectory optimization"],
    "security": ["malware detection", "cryptographic protocols", "intrusion detection", "side channels",
                 "access control", "fuzz testing", "phishing detection", "secure enclaves"],
    "theory": ["approximation algorithms", "graph coloring", "complexity lower bounds", "randomized rounding",
               "online algorithms", "streaming lower bounds", "matching algorithms", "parameterized complexity"],
}
SETTINGS = ["in a quiet village", "across three generations", "during one long night", "in 1980s Berlin",
            "on a remote island", "in the heart of New York", "in a mountain monastery", "aboard a cargo ship",
            "in a border town", "at a boarding school", "in post-war Vienna", "in a desert outpost"]


def half(pool: list, side: str) -> list:
    """The history's half of a pool (even entries) or the queries' (odd ones)."""
    return pool[0::2] if side == "history" else pool[1::2]


LEVELS = ("paraphrased", "readable")
RECENT = 8  # a drifting user's latest interactions that follow the new rule: over twice the default batch (3)


def _and(words: list[str]) -> str:
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} and {words[-1]}"


@dataclass(frozen=True)
class _Ranked:
    """LaMP-2M and LaMP-2N: labels cued by an item; the gold is the cued label the user ranks first."""

    labels: tuple[str, ...]
    cues: dict[str, list[str]]
    key: str  # the rule's key: "tag_priority", "category_priority"
    field: str  # a history item's field for the user's label
    # (rng, labels cued, side, level) -> a history item's fields, or a query's item text
    render: Callable[[random.Random, list[str], str, str], dict | str]

    def item(self, rng, ranking, side, level, must=()):
        """An item cueing 2-3 labels (all of `must`) and its gold under `ranking`."""
        n = rng.choice((2, 2, 3))
        others = [label for label in self.labels if label not in must]
        cued = [*must, *rng.sample(others, max(0, n - len(must)))]
        rng.shuffle(cued)
        return self._labelled(self.render(rng, cued, side, level), min(cued, key=ranking.index))

    def _labelled(self, item, gold):
        """A history item with the user's label in its field; a query as (text, gold)."""
        return {**item, self.field: gold} if isinstance(item, dict) else (item, gold)

    def __call__(self, rng, n_hist, n_query, *, level="paraphrased", drift=False):
        ranking = rng.sample(self.labels, len(self.labels))
        if level == "paraphrased" and not drift:  # today's sets, draw for draw
            def item(side):
                labels = rng.sample(list(self.cues), rng.choice((2, 2, 3)))
                return self._labelled(self.render(rng, labels, side, level), min(labels, key=ranking.index))

            return {self.key: ranking}, [item("history") for _ in range(n_hist)], [item("query") for _ in range(n_query)]
        if not drift:
            return ({self.key: ranking}, [self.item(rng, ranking, "history", level) for _ in range(n_hist)],
                    [self.item(rng, ranking, "query", level) for _ in range(n_query)])
        # rule B: a label A ranks in its last third moves to the top. Old items cue one of A's first
        # two (so A's favourites lead the whole history's counts) and, as often as any other label,
        # the moved one, which loses there: before the change the user passed it over, so the whole
        # history shows it chosen only lately (a summary of it lags). Recent items and queries cue
        # the moved label beside one of A's first two (so A and B answer each differently)
        moved = rng.choice(ranking[-5:])
        new = [moved, *(label for label in ranking if label != moved)]
        recent = min(RECENT, n_hist)
        old = [self.item(rng, ranking, "history", level, must=(rng.choice(ranking[:2]),))
               for _ in range(n_hist - recent)]
        latest = [self.item(rng, new, "history", level, must=(moved, rng.choice(ranking[:2]))) for _ in range(recent)]
        queries = [self.item(rng, new, "query", level, must=(moved, rng.choice(ranking[:2]))) for _ in range(n_query)]
        return {self.key: new, "drift": {"from": {self.key: ranking}, "recent": recent}}, old + latest, queries


def _film(rng, labels, side, level):
    if level == "readable":  # the tags by name; history and queries in different sentence forms
        setting = rng.choice(half(SETTINGS, side))
        if side == "history":
            return {"description": f"A film {setting} that is {_and(labels)}."}
        return f"Set {setting}, the movie: {', also '.join(labels)}."
    phrases = [rng.choice(half(CUES_2M[label], side)) for label in labels]
    setting = rng.choice(half(SETTINGS, side))
    if side == "history":
        return {"description": f"A film {setting} about {', '.join(phrases[:-1])} and {phrases[-1]}."}
    return f"Set {setting}, the story brings together {', '.join(phrases[:-1])} and {phrases[-1]}."


def _article(rng, labels, side, level):
    if level == "readable":
        if side == "history":
            return {"title": "Report", "text": f"A report on {_and(labels)}."}
        return f"Article. This piece covers {', also '.join(labels)}."
    phrases = [rng.choice(half(CUES_2N[label], side)) for label in labels]
    if side == "history":
        return {"title": f"On {phrases[0]}", "text": f"A report on {', '.join(phrases[:-1])} and {phrases[-1]}."}
    return f"Inside {phrases[0]}. This piece looks at {', '.join(phrases[:-1])}, then at {phrases[-1]}."


_lamp2m = _Ranked(TAGS_2M, CUES_2M, "tag_priority", "tag", _film)
_lamp2n = _Ranked(CATEGORIES_2N, CUES_2N, "category_priority", "category", _article)

# How a readable review states its tone: history and queries in different words.
STATED = {"history": "All told, it deserves {n} stars.", "query": "My verdict: {n} out of 5."}


def _review(rng: random.Random, tone: int, side: str, level: str = "paraphrased") -> str:
    first, second = rng.sample(half(TONES[tone], side), 2)
    aspects = rng.sample(ASPECTS, 2)
    text = f"The {rng.choice(PRODUCTS)}: {first.format(aspect=aspects[0])} {second.format(aspect=aspects[1])}"
    return f"{text} {STATED[side].format(n=tone)}" if level == "readable" else text


def rate(tone: int, bias: int) -> int:
    """A review's tone shifted by the user's bias, on the 1-5 scale."""
    return min(5, max(1, tone + bias))


def _lamp3(rng, n_hist, n_query, *, level="paraphrased", drift=False):
    bias = rng.choice((-2, -1, 1, 2))

    def item(side, biases):
        # tones every bias can shift without leaving the scale: the text alone (the tone) is always
        # off by the bias, and no score piles up at an end, where copying any label would hit it
        tone = rng.randint(max(1, *(1 - b for b in biases)), min(5, *(5 - b for b in biases)))
        text, gold = _review(rng, tone, side, level), str(rate(tone, biases[0]))
        return {"text": text, "score": gold} if side == "history" else (text, gold)

    if not drift:
        return {"rating_bias": bias}, [item("history", (bias,)) for _ in range(n_hist)], \
            [item("query", (bias,)) for _ in range(n_query)]
    # the bias changes sign (a generous scorer turns harsh, or the reverse), by 1 or 2 points
    new = -rng.choice((1, 2)) if bias > 0 else rng.choice((1, 2))
    if abs(bias) + abs(new) > 3:  # (+2, -2): only a 3 could be shifted both ways; keep a range of tones
        new = int(math.copysign(1, new))
    recent = min(RECENT, n_hist)
    hist = [item("history", (bias,)) for _ in range(n_hist - recent)] + \
        [item("history", (new, bias)) for _ in range(recent)]
    return {"rating_bias": new, "drift": {"from": {"rating_bias": bias}, "recent": recent}}, hist, \
        [item("query", (new, bias)) for _ in range(n_query)]


def _lamp1(rng, n_hist, n_query, *, level="paraphrased", drift=False):
    own = rng.choice(list(FIELDS))
    new = rng.choice([f for f in FIELDS if f != own]) if drift else own
    named = (lambda field: f" ({field})") if level == "readable" else (lambda field: "")

    def paper(field):
        a, b = rng.sample(half(FIELDS[field], "history"), 2)
        return f"Scalable {a} with {b}{named(field)}"

    def written(field):
        return {"title": paper(field), "abstract": f"We study {rng.choice(half(FIELDS[field], 'history'))} and report gains."}

    recent = min(RECENT, n_hist) if drift else 0
    hist = [written(own) for _ in range(n_hist - recent)] + [written(new) for _ in range(recent)]

    def reference(field):  # other authors' papers, on the topics no history paper names
        a, b = rng.sample(half(FIELDS[field], "query"), 2)
        return f"Towards {a} for {b}{named(field)}"

    def query(n):
        # a drifting author's distractor is from their old field: the old rule cites it
        other = own if drift else rng.choice([f for f in FIELDS if f != own])
        own_first = n % 2 == 0  # balanced: a reader who cannot tell scores exactly one half
        refs = [reference(new), reference(other)] if own_first else [reference(other), reference(new)]
        title = (f"Learning {rng.choice(half(FIELDS[new], 'query'))} meets "
                 f"{rng.choice(half(FIELDS[other], 'query'))}")
        return title, refs, "[1]" if own_first else "[2]"

    rule = {"field": new, **({"drift": {"from": {"field": own}, "recent": recent}} if drift else {})}
    return rule, hist, [query(n) for n in range(n_query)]


GENERATORS = {"lamp1": _lamp1, "lamp2m": _lamp2m, "lamp2n": _lamp2n, "lamp3": _lamp3}


def generate(task: Task, n_users: int = 8, n_history: int = 40, *, n_queries: int = 6, seed: int = 0,
             level: str = "paraphrased", drift: bool = False):
    """Return (questions, outputs, rules): LaMP records plus each user's latent rule (a drifting
    user's: the current one, with the old one and the date it changed under `drift`). Every
    question is dated after its user's whole history."""
    if level not in LEVELS:
        raise ValueError(f"level must be one of {LEVELS}, not {level!r}")
    variant = "" if (level, drift) == ("paraphrased", False) else f"-{level}{'-drift' if drift else ''}"
    rng = random.Random(f"{task.key}-{seed}{variant}")
    questions, golds, rules = [], [], {}
    start = date(2024, 1, 1)
    for u in range(n_users):
        uid = f"u{u:04d}"
        rule, hist, queries = GENERATORS[task.key](rng, n_history, n_queries, level=level, drift=drift) if variant else \
            GENERATORS[task.key](rng, n_history, n_queries)
        if level == "readable":
            rule["level"] = level
        if "drift" in rule:
            rule["drift"]["on"] = (start + timedelta(days=n_history - rule["drift"].pop("recent"))).isoformat()
        rules[uid] = rule
        profile = [{"id": f"{uid}-h{i:03d}", **item, "date": (start + timedelta(days=i)).isoformat()}
                   for i, item in enumerate(hist)]
        asked = (start + timedelta(days=n_history)).isoformat()
        for q, query in enumerate(queries):
            qid = f"{uid}-q{q:02d}"
            if task.key == "lamp1":
                title, refs, gold = query
                text = task.make_input(title, task.labels) + f' [1]: "{refs[0]}" [2]: "{refs[1]}"'
            else:
                content, gold = query
                labels = list(task.labels)
                rng.shuffle(labels)  # releases order the label list differently; parse, don't assume
                text = task.make_input(content, labels)
            questions.append({"id": qid, "user_id": uid, "date": asked, "input": text, "profile": profile})
            golds.append({"id": qid, "output": gold})
    return questions, {"task": task.name.replace("-", "_"), "golds": golds}, rules


# -- what the planted rule answers, and the profile that says it -----------------------------------


def _labels_cued(cues: dict[str, list[str]], text: str, readable: bool = False) -> list[str]:
    """The labels an item cues: by their phrases, or on the readable level by name ("dark comedy"
    names dark comedy, not comedy)."""
    if not readable:
        return [label for label, phrases in cues.items() if any(p in text for p in phrases)]
    return named_labels(list(cues), text)


def _tone(text: str) -> int | None:
    for tone, sentences in TONES.items():
        for sentence in sentences:
            if re.search(re.escape(sentence).replace(re.escape("{aspect}"), r"\w+"), text):
                return tone
    return None


def _field(title: str) -> str | None:
    return next((f for f, topics in FIELDS.items() if any(t in title for t in topics)), None)


def planted(task: Task, rule: dict, query: str) -> str | None:
    """The answer of the user's planted rule, read off the query's text the way the generator wrote
    it (which labels it cues, which tone it reads as, which field a reference is in)."""
    content = task.query_content(query)
    if "tag_priority" in rule or "category_priority" in rule:
        ranking = rule.get("tag_priority") or rule["category_priority"]
        cued = _labels_cued(CUES_2M if "tag_priority" in rule else CUES_2N, content, rule.get("level") == "readable")
        return min(cued, key=ranking.index) if cued else None
    if "rating_bias" in rule:
        tone = _tone(content)
        return None if tone is None else str(rate(tone, rule["rating_bias"]))
    if "field" in rule and task.candidates_pattern:
        return next((label for label, title in re.findall(task.candidates_pattern, query)
                     if _field(title) == rule["field"]), None)
    return None


def rule_profile(task: Task, rule: dict) -> str:
    """The planted rule written out as a profile, in the task's terms: what an oracle would write."""
    if "tag_priority" in rule or "category_priority" in rule:
        ranking = rule.get("tag_priority") or rule["category_priority"]
        return (f"{task.preference_lead}: {', '.join(ranking[:3])}. When several fit an item, this user always "
                f"picks the one that comes first in this order: {' > '.join(ranking)}.")
    if "rating_bias" in rule:
        b = rule["rating_bias"]
        lean = TENDENCIES[2] if b > 0 else TENDENCIES[0]
        return (f"{task.preference_lead} {lean}: {abs(b)} point{'s' if abs(b) > 1 else ''} "
                f"{'above' if b > 0 else 'below'} what the review's tone suggests (a review that reads as a 3 gets "
                f"a {rate(3, b)}, one that reads as a 1 gets a {rate(1, b)}, one that reads as a 5 gets a {rate(5, b)}).")
    if "field" in rule:
        topics = FIELDS[rule["field"]]
        return (f"{task.preference_lead}: {', '.join(topics[:3])}. This author works in {rule['field']} "
                f"({', '.join(topics)}) and cites papers of that field over any other.")
    raise ValueError(f"no profile for the rule {rule}")


@dataclass(frozen=True)
class Calibration:
    """What rules that need no LLM score on a generated set (accuracy: exact answers)."""

    lookup: float  # copying the label of the most similar history item: must stay low
    planted: float  # the user's planted rule read off the text: 1.0 when the text carries it
    stale: float | None = None  # drifting users: their old rule (what a profile of the old history says)


def calibrate(task: Task, questions: list[dict], golds: dict[str, str], *, rules: dict[str, dict]) -> Calibration:
    wanted = [golds[q["id"]] for q in questions]
    copied = [lookup(task, q["input"], [(task.item_text(it), task.item_response(it)) for it in q["profile"]])
              for q in questions]
    ruled = [planted(task, rules[q["user_id"]], q["input"]) for q in questions]
    old = {u: {**r["drift"]["from"], **({"level": r["level"]} if "level" in r else {})}
           for u, r in rules.items() if "drift" in r}
    stale = accuracy([planted(task, old[q["user_id"]], q["input"]) for q in questions], wanted) if old else None
    return Calibration(accuracy(copied, wanted), accuracy(ruled, wanted), stale)


MAX_LOOKUP = 0.5  # a set that copying answers better than this measures copying
MAX_STALE = 0.2  # a drift set on which the old rule still answers more than this cannot show a change


def write_dataset(out_dir: str | Path, task: Task, split: str = "dev", **kwargs) -> Path:
    return make_dataset(out_dir, task, split, **kwargs)[0]


def make_dataset(out_dir: str | Path, task: Task, split: str = "dev", **kwargs) -> tuple[Path, Calibration]:
    """Write `{split}_questions.json`, `{split}_outputs.json` and `rules.json` atomically, after
    checking that copying does not answer the set (`calibrate`; a ValueError otherwise)."""
    out = Path(out_dir)
    questions, outputs, rules = generate(task, **kwargs)
    check = calibrate(task, questions, {g["id"]: g["output"] for g in outputs["golds"]}, rules=rules)
    if check.lookup > MAX_LOOKUP:
        raise ValueError(f"{task.name}: copying the most similar history item's label answers {check.lookup:.2f} of "
                         f"the queries (at most {MAX_LOOKUP} allowed): the set would measure copying")
    if check.stale is not None and check.stale > MAX_STALE:
        raise ValueError(f"{task.name}: the drifting users' old rule still answers {check.stale:.2f} of the queries "
                         f"(at most {MAX_STALE} allowed): the set could not show that alignment found the change")
    out.mkdir(parents=True, exist_ok=True)
    for name, data in ((f"{split}_questions.json", questions), (f"{split}_outputs.json", outputs),
                       ("rules.json", rules)):
        atomic_write_text(out / name, json.dumps(data, indent=1))
    return out, check


SETS = ("stable", "drift", "readable", "readable-drift")  # the shipped sets of every task: users x level


def shipped_data_dir(task: Task, which: str = "stable") -> Path:
    """A small generated set that ships with the package: `stable` (paraphrased items, users whose
    rule never changes), `drift` (paraphrased, drifting users), `readable`, `readable-drift`."""
    if which not in SETS:
        raise ValueError(f"no shipped set {which!r}; choose from {SETS}")
    return Path(__file__).parent / (task.key if which == "stable" else f"{task.key}-{which}")


def set_options(which: str) -> dict:
    """`generate`'s options for a shipped set."""
    return {"level": "readable" if which.startswith("readable") else "paraphrased", "drift": which.endswith("drift")}

