"""Serving: answer one query as a user's agent, with the persona `production` points at."""

from __future__ import annotations

import dspy

from .config import Settings
from .eval.tasks import Task
from .llm import adapter_for, build_lm
from .pipelines.agent import PersonaAgent
from .pipelines.memory import EpisodicMemory, UserMemory
from .registry import PersonaRegistry


def answer(settings: Settings, task: Task, user_id: str, query: str, lm: dspy.LM | None = None) -> str:
    persona = PersonaRegistry(task).get(user_id).persona  # raises PersonaNotFound for unknown users
    memory = EpisodicMemory.open(path=str(settings.qdrant_path), url=settings.qdrant_url)
    try:
        lm = lm or build_lm(settings.lm)
        agent = PersonaAgent(persona, UserMemory(memory, user_id, settings.top_k), max_iters=settings.max_iters)
        with dspy.context(lm=lm, adapter=dspy.settings.adapter or adapter_for(lm)):
            return agent(query=query).answer
    finally:
        memory.close()
