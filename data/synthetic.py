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

Output is the LaMP layout (`{split}_questions.json` + `{split}_outputs.json`), with a `user_id`
on each question so several queries can share one user, and a `date` on every profile item.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path

from persona_agent.data.atomic import atomic_write_text
from persona_agent.data.calibration import accuracy, lookup
from persona_agent.data.tasks import CATEGORIES_2N, TAGS_2M, TENDENCIES, Task

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


def _cued(rng: random.Random, cues: dict[str, list[str]], ranking: list[str], side: str):
    labels = rng.sample(list(cues), rng.choice((2, 2, 3)))
    phrases = [rng.choice(half(cues[label], side)) for label in labels]
    return phrases, min(labels, key=ranking.index)


def _lamp2m(rng, n_hist, n_query):
    ranking = rng.sample(TAGS_2M, len(TAGS_2M))

    def item(side):
        phrases, gold = _cued(rng, CUES_2M, ranking, side)
        setting = rng.choice(half(SETTINGS, side))
        if side == "history":
            return f"A film {setting} about {', '.join(phrases[:-1])} and {phrases[-1]}.", gold
        return f"Set {setting}, the story brings together {', '.join(phrases[:-1])} and {phrases[-1]}.", gold

    hist = [dict(zip(("description", "tag"), item("history"))) for _ in range(n_hist)]
    return {"tag_priority": ranking}, hist, [item("query") for _ in range(n_query)]


def _lamp2n(rng, n_hist, n_query):
    ranking = rng.sample(CATEGORIES_2N, len(CATEGORIES_2N))

    def item(side):
        phrases, gold = _cued(rng, CUES_2N, ranking, side)
        if side == "history":
            return f"On {phrases[0]}", f"A report on {', '.join(phrases[:-1])} and {phrases[-1]}.", gold
        return f"Inside {phrases[0]}", f"This piece looks at {', '.join(phrases[:-1])}, then at {phrases[-1]}.", gold

    hist = [dict(zip(("title", "text", "category"), item("history"))) for _ in range(n_hist)]
    queries = [(f"{title}. {text}", gold) for title, text, gold in (item("query") for _ in range(n_query))]
    return {"category_priority": ranking}, hist, queries


def _review(rng: random.Random, tone: int, side: str) -> str:
    first, second = rng.sample(half(TONES[tone], side), 2)
    aspects = rng.sample(ASPECTS, 2)
    return f"The {rng.choice(PRODUCTS)}: {first.format(aspect=aspects[0])} {second.format(aspect=aspects[1])}"


def rate(tone: int, bias: int) -> int:
    """A review's tone shifted by the user's bias, on the 1-5 scale."""
    return min(5, max(1, tone + bias))


def _lamp3(rng, n_hist, n_query):
    bias = rng.choice((-2, -1, 1, 2))

    def item(side):
        # tones the bias can shift without leaving the scale: the text alone (the tone) is always
        # off by the bias, and no score piles up at an end, where copying any label would hit it
        tone = rng.randint(max(1, 1 - bias), min(5, 5 - bias))
        return _review(rng, tone, side), str(rate(tone, bias))

    hist = [dict(zip(("text", "score"), item("history"))) for _ in range(n_hist)]
    return {"rating_bias": bias}, hist, [item("query") for _ in range(n_query)]


def _lamp1(rng, n_hist, n_query):
    own = rng.choice(list(FIELDS))

    def paper(field):
        a, b = rng.sample(half(FIELDS[field], "history"), 2)
        return f"Scalable {a} with {b}"

    hist = [{"title": paper(own), "abstract": f"We study {rng.choice(half(FIELDS[own], 'history'))} and report gains."}
            for _ in range(n_hist)]

    def reference(field):  # other authors' papers, on the topics no history paper names
        a, b = rng.sample(half(FIELDS[field], "query"), 2)
        return f"Towards {a} for {b}"

    def query(n):
        other = rng.choice([f for f in FIELDS if f != own])
        own_first = n % 2 == 0  # balanced: a reader who cannot tell scores exactly one half
        refs = [reference(own), reference(other)] if own_first else [reference(other), reference(own)]
        title = (f"Learning {rng.choice(half(FIELDS[own], 'query'))} meets "
                 f"{rng.choice(half(FIELDS[other], 'query'))}")
        return title, refs, "[1]" if own_first else "[2]"

    return {"field": own}, hist, [query(n) for n in range(n_query)]


GENERATORS = {"lamp1": _lamp1, "lamp2m": _lamp2m, "lamp2n": _lamp2n, "lamp3": _lamp3}


def generate(task: Task, n_users: int = 8, n_history: int = 40, n_queries: int = 6, seed: int = 0):
    """Return (questions, outputs, rules): LaMP records plus each user's latent rule. Every
    question is dated after its user's whole history."""
    rng = random.Random(f"{task.key}-{seed}")
    questions, golds, rules = [], [], {}
    start = date(2024, 1, 1)
    for u in range(n_users):
        uid = f"u{u:04d}"
        rule, hist, queries = GENERATORS[task.key](rng, n_history, n_queries)
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


def _labels_cued(cues: dict[str, list[str]], text: str) -> list[str]:
    return [label for label, phrases in cues.items() if any(p in text for p in phrases)]


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
        cued = _labels_cued(CUES_2M if "tag_priority" in rule else CUES_2N, content)
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
    """What two rules that need no LLM score on a generated set (accuracy: exact answers)."""

    lookup: float  # copying the label of the most similar history item: must stay low
    planted: float  # the user's planted rule read off the text: 1.0 when the text carries it


def calibrate(task: Task, questions: list[dict], golds: dict[str, str], rules: dict[str, dict]) -> Calibration:
    wanted = [golds[q["id"]] for q in questions]
    copied = [lookup(task, q["input"], [(task.item_text(it), task.item_response(it)) for it in q["profile"]])
              for q in questions]
    ruled = [planted(task, rules[q["user_id"]], q["input"]) for q in questions]
    return Calibration(accuracy(copied, wanted), accuracy(ruled, wanted))


MAX_LOOKUP = 0.5  # a set that copying answers better than this measures copying


def write_dataset(out_dir: str | Path, task: Task, split: str = "dev", **kwargs) -> Path:
    return make_dataset(out_dir, task, split, **kwargs)[0]


def make_dataset(out_dir: str | Path, task: Task, split: str = "dev", **kwargs) -> tuple[Path, Calibration]:
    """Write `{split}_questions.json`, `{split}_outputs.json` and `rules.json` atomically, after
    checking that copying does not answer the set (`calibrate`; a ValueError otherwise)."""
    out = Path(out_dir)
    questions, outputs, rules = generate(task, **kwargs)
    check = calibrate(task, questions, {g["id"]: g["output"] for g in outputs["golds"]}, rules)
    if check.lookup > MAX_LOOKUP:
        raise ValueError(f"{task.name}: copying the most similar history item's label answers {check.lookup:.2f} of "
                         f"the queries (at most {MAX_LOOKUP} allowed): the set would measure copying")
    out.mkdir(parents=True, exist_ok=True)
    for name, data in ((f"{split}_questions.json", questions), (f"{split}_outputs.json", outputs),
                       ("rules.json", rules)):
        atomic_write_text(out / name, json.dumps(data, indent=1))
    return out, check


def shipped_data_dir(task: Task) -> Path:
    """The small generated dataset that ships with the package."""
    return Path(__file__).parent / task.key

