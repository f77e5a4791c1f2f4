"""The persona: a fixed template with one user-specific slot.

Only the slot (the user profile, first written from semantic memory, then refined by alignment)
is ever rewritten; the task rules and output format around it are fixed, so no rewrite can drop
them.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

from persona_agent.eval.tasks import Task

TEMPLATE = """You act on behalf of one user: {task_description}.
Answer as this user would, not as an average person would.
Rules:
- Answer with exactly one of the labels the request allows.
- The user's past interactions are the strongest evidence: look for past items like this one and follow the user's own choices there.
- Use the profile below to decide between labels that all fit.
User profile:
{profile}"""

# Templates of the baselines: the same slot, without the persona's framing (MemBank, PAG), or
# with no user-specific text at all (ReAct, RAG, "w/o persona").
SUMMARY_TEMPLATE = """Answer the request for this user: {task_description}.
User summary:
{profile}"""
GENERIC_TEMPLATE = """Answer the request: {task_description}.
Past interactions of the user may help."""

PROFILE_BUDGET = 1200  # characters; keeps prompts short enough for small local models


@dataclass(frozen=True)
class Persona:
    task: Task
    profile: str
    template: str = TEMPLATE

    def __post_init__(self):
        object.__setattr__(self, "profile", clip(self.profile.strip() or "(nothing known yet)", PROFILE_BUDGET))

    def render(self) -> str:
        return self.template.format(task_description=self.task.description, profile=self.profile)

    def with_profile(self, profile: str) -> "Persona":
        return Persona(self.task, profile, self.template)

    @classmethod
    def parse(cls, task: Task, text: str) -> "Persona":
        """Read a rendered persona back; refuses text whose fixed parts are not this template's."""
        fixed = TEMPLATE.format(task_description=task.description, profile="")
        if not text.startswith(fixed):
            raise ValueError(f"not a {task.name} persona: its fixed template parts differ")
        return cls(task, text[len(fixed):])


# Lines of the fixed template: a rewrite that restates them is trying to edit the fixed parts.
_FIXED_MARKERS = ("Rules:", "User profile:", "You act on behalf of one user", "Answer with exactly one")


def profile_problem(text: str, budget: int = PROFILE_BUDGET) -> str | None:
    """Why a rewritten profile cannot be used, or None when it can."""
    if looks_degenerate(text):
        return "empty or degenerate text"
    if len(text.strip()) > budget:
        return f"over the length budget ({len(text.strip())} > {budget} characters)"
    marker = next((m for m in _FIXED_MARKERS if m.lower() in text.lower()), None)
    if marker:
        return f"restates the fixed template ({marker!r})"
    return None


def clip(text: str, budget: int) -> str:
    """Cut to `budget` characters at the last sentence end that fits."""
    if len(text) <= budget:
        return text
    cut = text[:budget]
    end = cut.rfind(". ")
    return cut[: end + 1] if end > budget // 2 else cut


def looks_degenerate(text: str) -> bool:
    """True for empty text or a loop ("_1_1_1_1..."): what a struggling LM writes instead of a
    profile. Such text compresses to almost nothing."""
    text = text.strip()
    if len(text) < 3:
        return True
    return len(text) > 80 and len(zlib.compress(text.encode())) / len(text) < 0.15
