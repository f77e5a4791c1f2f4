"""How the application builds the per-user flow and the alignment optimizer from `Settings`:
each is built here and nowhere else (eval's methods, the demo, the nightly jobs and serving all
call these)."""

from __future__ import annotations

from typing import Callable

from persona_agent.data.tasks import Task
from persona_agent.optimizers import ACCEPTANCE, AlignmentStep, PersonaAlignment
from persona_agent.pipelines.flow import UserFlow
from persona_agent.pipelines.memory import EpisodicMemory, MemoryItem
from persona_agent.settings import Settings


def user_flow(settings: Settings, task: Task, user_id: str, *, history: list[MemoryItem],
              memory: EpisodicMemory) -> UserFlow:
    return UserFlow(task, user_id, history, memory, top_k=settings.top_k, max_iters=settings.max_iters,
                    answer_step=settings.answer_step, prior_strength=settings.prior_strength,
                    support_margin=settings.support_margin,
                    profile_items=settings.profile_items)


def alignment(settings: Settings, *, metric=None,
              on_step: Callable[[AlignmentStep], None] | None = None) -> PersonaAlignment:
    acceptance = ACCEPTANCE[settings.acceptance if settings.guard else "paper"]()
    return PersonaAlignment(batch_size=settings.batch_size, iterations=settings.iterations, metric=metric,
                            loss=settings.loss, acceptance=acceptance, holdout=settings.holdout, on_step=on_step,
                            redraw_temperature=settings.redraw_temperature)
