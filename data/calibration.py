"""What a number can mean: a floor that needs no LLM and only copies.

`lookup` answers a query by copying: the label of the user's history item that shares the most
3-word phrases with it (the latest on a tie). For a task whose history carries no labels but whose
queries offer candidates (LaMP-1's two references), it picks the candidate that shares the most
3-word phrases with the history (the first on a tie). Where nothing shares a phrase there is
nothing to copy, and it gives no answer (scored wrong). A data set on which this scores well
measures copying, not personalization (`make-data` refuses to write one); as an `eval` row it
shows what copying alone reaches.
"""

from __future__ import annotations

import re
from typing import Sequence

from persona_agent.data.tasks import Task


def trigrams(text: str) -> set[tuple[str, str, str]]:
    words = re.findall(r"[a-z0-9']+", text.lower())
    return set(zip(words, words[1:], words[2:]))


def lookup(task: Task, query: str, history: Sequence[tuple[str, str | None]]) -> str | None:
    """history: (item text, the user's response or None), oldest first."""
    labelled = [(trigrams(text), response) for text, response in history if response is not None]
    if labelled:
        shown = trigrams(task.query_content(query))
        best = max(range(len(labelled)), key=lambda i: (len(shown & labelled[i][0]), i))
        return labelled[best][1] if shown & labelled[best][0] else None
    if task.candidates_pattern:
        candidates = re.findall(task.candidates_pattern, query)
        seen = set().union(*(trigrams(text) for text, _ in history)) if history else set()
        shared = [len(trigrams(text) & seen) for _, text in candidates]
        if shared and max(shared) > 0:
            return candidates[shared.index(max(shared))][0]
    return None


def accuracy(answers: Sequence[str | None], golds: Sequence[str]) -> float:
    return sum(a == g for a, g in zip(answers, golds)) / len(golds) if golds else 0.0
