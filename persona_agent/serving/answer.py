"""Serving: answer one query as a user's agent, with the persona `production` points at."""

from __future__ import annotations

import dspy

from persona_agent.data.tasks import Task
from persona_agent.runtime.llm import adapter_for, build_lm
from persona_agent.runtime.store import Store
from persona_agent.runtime.wiring import user_flow


def answer(store: Store, task: Task, user_id: str, query: str, lm: dspy.LM | None = None) -> str:
    """`store`: opened with persistent memory (the user's history, as `ingest` wrote it)."""
    persona = store.registry(task).get(user_id).persona  # raises PersonaNotFound for unknown users
    agent = user_flow(store.settings, task, user_id, [], store.memory).agent(persona, semantic=persona.profile)
    lm = lm or build_lm(store.settings.lm)
    with dspy.context(lm=lm, adapter=dspy.settings.adapter or adapter_for(lm)):
        return agent(query=query).answer
