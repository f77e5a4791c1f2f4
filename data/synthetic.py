"""Generate LaMP-format data where personalization is measurable.

Every synthetic user has a latent preference rule that their history reveals, and every item is
ambiguous so that its gold label depends on the user:

- LaMP-2M / LaMP-2N: each item cues 2-3 labels; the user's gold is the cued label that ranks
  highest in the user's private priority order. A non-personalized answer picks among the cued
  labels at chance (~40%).
- LaMP-3: each review reads as a base score; the user's gold is the base shifted by the user's
  rating bias (harsh or generous). A non-personalized answer (the base) is off by the bias.
- LaMP-1: each query's title mixes two research fields; the gold reference is the one in the
  user's own field, which only their paper history shows.

Output is the LaMP layout (`{split}_questions.json` + `{split}_outputs.json`), with a `user_id`
on each question so several queries can share one user, and a `date` on every profile item.
"""

from __future__ import annotations

import json
import random
from datetime import date, timedelta
from pathlib import Path

from persona_agent.data.atomic import atomic_write_text
from persona_agent.data.tasks import CATEGORIES_2N, TAGS_2M, Task

CUES_2M = {
    "sci-fi": ["a starship crew", "an alien signal", "a colony on Mars", "a rogue android"],
    "based on a book": ["adapted from the bestselling novel", "from the beloved book", "the novel's famous chapters"],
    "comedy": ["a string of hilarious mishaps", "a bumbling best friend", "a wedding gone absurdly wrong"],
    "action": ["a high-speed car chase", "an explosive heist", "a rooftop shootout"],
    "twist ending": ["a final reveal that changes everything", "nothing is what it seems", "a shocking last scene"],
    "dystopia": ["a totalitarian future state", "a ruined society under surveillance", "rationed lives after the collapse"],
    "dark comedy": ["a funeral that turns into farce", "gallows humour about a botched crime", "a morbidly funny family feud"],
    "classic": ["a timeless black-and-white story", "a golden-age Hollywood epic", "a landmark of early cinema"],
    "psychology": ["a fractured mind", "obsession and memory", "a patient and her therapist"],
    "fantasy": ["a dragon and a cursed kingdom", "a wizard's apprentice", "an enchanted forest"],
    "romance": ["two strangers fall in love", "a long-distance love affair", "a second chance at love"],
    "thought-provoking": ["questions about what makes us human", "a moral dilemma with no easy answer", "a meditation on time"],
    "social commentary": ["inequality in a small town", "a satire of corporate greed", "a community divided by class"],
    "violence": ["a brutal gang war", "a bloody revenge spree", "savage street fights"],
    "true story": ["the real events of 1972", "the true account of a famous trial", "based on real survivors"],
}
CUES_2N = {
    "travel": ["hidden beaches of Portugal", "a budget guide to Tokyo", "the best road trips this summer"],
    "education": ["public school funding", "new college admission rules", "teachers and classroom technology"],
    "parents": ["raising toddlers", "bedtime battles with kids", "parenting teenagers online"],
    "style & beauty": ["spring fashion trends", "a skincare routine", "red carpet looks"],
    "entertainment": ["a blockbuster box office weekend", "a celebrity interview", "the new streaming series"],
    "food & drink": ["a simple pasta recipe", "craft beer tasting", "a new vegan restaurant"],
    "science & technology": ["a new smartphone chip", "a breakthrough in quantum computing", "a Mars rover discovery"],
    "business": ["quarterly earnings", "a startup raising funds", "a merger between two banks"],
    "sports": ["the championship final", "a star quarterback's injury", "the marathon record"],
    "healthy living": ["a daily workout plan", "sleep and stress", "mindful eating habits"],
    "women": ["women in leadership", "the gender pay gap", "female founders"],
    "politics": ["the senate vote", "a campaign rally", "the new election law"],
    "crime": ["a bank robbery suspect", "a fraud investigation", "the murder trial verdict"],
    "culture & arts": ["a museum retrospective", "a new opera production", "a poetry festival"],
    "religion": ["a papal visit", "interfaith dialogue", "a pilgrimage to Mecca"],
}
REVIEW_BASE = {
    1: ["It broke on the first day and support ignored me.", "Completely useless, a waste of money."],
    2: ["It works, barely, and feels cheap.", "Disappointing quality for the price."],
    3: ["It is okay, does what it says, nothing more.", "Average product with some flaws."],
    4: ["Good product, works well with minor issues.", "Solid and reliable, I am satisfied."],
    5: ["Excellent, exceeded every expectation.", "Perfect, the best purchase I have made."],
}
PRODUCTS = ["blender", "headphones", "backpack", "desk lamp", "phone case", "kettle", "keyboard", "tent"]
FIELDS = {
    "databases": ["query optimization", "transaction processing", "index structures", "distributed storage"],
    "vision": ["image segmentation", "object detection", "visual tracking", "scene reconstruction"],
    "nlp": ["machine translation", "language models", "question answering", "text summarization"],
    "robotics": ["motion planning", "robot grasping", "legged locomotion", "swarm control"],
    "security": ["malware detection", "cryptographic protocols", "intrusion detection", "side channels"],
    "theory": ["approximation algorithms", "graph coloring", "complexity lower bounds", "randomized rounding"],
}
SETTINGS = ["in a quiet village", "across three generations", "during one long night", "in 1980s Berlin",
            "on a remote island", "in the heart of New York"]


def _unseen(make, n: int, seen: set[str], content=lambda item: item[0]) -> list:
    """`n` items from `make()` whose content is none of `seen`: a query that repeats a history item
    verbatim would be answered by the user's own past response, not by what the history teaches."""
    out = []
    for _ in range(1000 * n):
        if len(out) == n:
            break
        item = make()
        if content(item) not in seen:
            out.append(item)
    else:
        raise ValueError(f"cannot draw {n} items unlike the history: too few kinds of item for this history length")
    return out


def _cued_item(rng: random.Random, cues: dict[str, list[str]], ranking: list[str]) -> tuple[str, str]:
    labels = rng.sample(list(cues), rng.choice((2, 2, 3)))
    phrases = [rng.choice(cues[label]) for label in labels]
    gold = min(labels, key=ranking.index)
    return phrases, gold


def _lamp2m(rng, uid, n_hist, n_query):
    ranking = rng.sample(TAGS_2M, len(TAGS_2M))
    def item():
        phrases, gold = _cued_item(rng, CUES_2M, ranking)
        return f"A film {rng.choice(SETTINGS)} about {', '.join(phrases[:-1])} and {phrases[-1]}.", gold
    hist = [dict(zip(("description", "tag"), item())) for _ in range(n_hist)]
    queries = _unseen(item, n_query, {h["description"] for h in hist})
    return {"rule": {"tag_priority": ranking}}, hist, queries


def _lamp2n(rng, uid, n_hist, n_query):
    ranking = rng.sample(CATEGORIES_2N, len(CATEGORIES_2N))
    def item():
        phrases, gold = _cued_item(rng, CUES_2N, ranking)
        return f"On {phrases[0]}", f"A report on {', '.join(phrases[:-1])} and {phrases[-1]}.", gold
    hist = [dict(zip(("title", "text", "category"), item())) for _ in range(n_hist)]
    article = lambda i: f"{i[0]}. {i[1]}"  # noqa: E731  (how LaMP-2N shows an item)
    queries = [(article(i), i[2]) for i in _unseen(item, n_query, {article((h["title"], h["text"])) for h in hist},
                                                   article)]
    return {"rule": {"category_priority": ranking}}, hist, queries


def _lamp3(rng, uid, n_hist, n_query):
    bias = rng.choice((-2, -1, 1, 2))
    def item():
        base = rng.randint(1, 5)
        text = f"The {rng.choice(PRODUCTS)}: {rng.choice(REVIEW_BASE[base])}"
        return text, str(min(5, max(1, base + bias)))
    hist = [dict(zip(("text", "score"), item())) for _ in range(n_hist)]
    queries = _unseen(item, n_query, {h["text"] for h in hist})
    return {"rule": {"rating_bias": bias}}, hist, queries


def _lamp1(rng, uid, n_hist, n_query):
    own = rng.choice(list(FIELDS))
    def paper(field):
        a, b = rng.sample(FIELDS[field], 2)
        return f"Scalable {a} with {b}"
    hist = [{"title": paper(own), "abstract": f"We study {rng.choice(FIELDS[own])} and report gains."}
            for _ in range(n_hist)]
    written = {h["title"] for h in hist}

    def reference(field):
        a, b = rng.sample(FIELDS[field], 2)
        return f"Towards {a} for {b}"

    def query():
        other = rng.choice([f for f in FIELDS if f != own])
        own_first = rng.random() < 0.5
        # references are other authors' papers (another title pattern), never one the user wrote
        refs = [reference(own), reference(other)] if own_first else [reference(other), reference(own)]
        title = f"Learning {rng.choice(FIELDS[own])} meets {rng.choice(FIELDS[other])}"
        return title, refs, "[1]" if own_first else "[2]"

    return {"rule": {"field": own}}, hist, _unseen(query, n_query, written)


GENERATORS = {"lamp1": _lamp1, "lamp2m": _lamp2m, "lamp2n": _lamp2n, "lamp3": _lamp3}


def generate(task: Task, n_users: int = 8, n_history: int = 40, n_queries: int = 6, seed: int = 0):
    """Return (questions, outputs, rules): LaMP records plus each user's latent rule."""
    rng = random.Random(f"{task.key}-{seed}")
    questions, golds, rules = [], [], {}
    start = date(2024, 1, 1)
    for u in range(n_users):
        uid = f"u{u:04d}"
        rule, hist, queries = GENERATORS[task.key](rng, uid, n_history, n_queries)
        rules[uid] = rule["rule"]
        profile = [{"id": f"{uid}-h{i:03d}", **item, "date": (start + timedelta(days=i)).isoformat()}
                   for i, item in enumerate(hist)]
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
            questions.append({"id": qid, "user_id": uid, "input": text, "profile": profile})
            golds.append({"id": qid, "output": gold})
    return questions, {"task": task.name.replace("-", "_"), "golds": golds}, rules


def write_dataset(out_dir: str | Path, task: Task, split: str = "dev", **kwargs) -> Path:
    """Write `{split}_questions.json`, `{split}_outputs.json` and `rules.json` atomically."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    questions, outputs, rules = generate(task, **kwargs)
    for name, data in ((f"{split}_questions.json", questions), (f"{split}_outputs.json", outputs),
                       ("rules.json", rules)):
        atomic_write_text(out / name, json.dumps(data, indent=1))
    return out


def shipped_data_dir(task: Task) -> Path:
    """The small generated dataset that ships with the package."""
    return Path(__file__).parent / task.key

