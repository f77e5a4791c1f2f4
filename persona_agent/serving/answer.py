"""Serving: answer one query as a user's agent, with the persona `production` points at."""

from __future__ import annotations

import logging
import shlex
import sqlite3

import dspy

from persona_agent.adapters import tracking
from persona_agent.adapters.llm import adapter_for, build_lm
from persona_agent.adapters.lm_cache import owned_by
from persona_agent.adapters.state import StateStore
from persona_agent.data.loaders import shown
from persona_agent.data.tasks import Task
from persona_agent.pipelines.points import StoreDamaged
from persona_agent.runtime.erasures import being_forgotten
from persona_agent.runtime.store import Store
from persona_agent.runtime.wiring import user_flow


def answer(store: Store, task: Task, user_id: str, *, query: str, lm: dspy.LM | None = None) -> str:
    """`store`: opened with persistent memory (the user's history, as `ingest` wrote it)."""
    if erase := being_forgotten(store.settings.store, user_id):  # whatever of theirs is left is not served
        raise LookupError(f"{shown(user_id)} is being forgotten (an erase begun {erase['at']} did not finish): "
                          f"`persona-agent forget {shlex.quote(user_id)}` finishes it")
    version = store.registry(task).get(user_id)  # raises PersonaNotFound for unknown users
    aligned_on = _aligned_on(store, task, user_id)
    if store.memory.count(user_id) < aligned_on:  # nothing deletes a memory but `forget`, which drops the state too
        raise StoreDamaged(store.settings.qdrant_path, f"{user_id}'s history shrank below the {aligned_on} items "
                                                        "their persona was aligned on")
    persona = version.persona
    agent = user_flow(store.settings, task, user_id, history=[], memory=store.memory).agent(persona,
                                                                                            semantic=persona.profile)
    lm = lm or build_lm(store.settings.lm)
    with dspy.context(lm=lm, adapter=dspy.settings.adapter or adapter_for(lm)), owned_by(user_id), \
            tracking.trace("answer", user=user_id, task=task.key, method="persona-agent", persona_version=version.version):
        return agent(query=query).answer


def _aligned_on(store: Store, task: Task, user_id: str) -> int:
    """How many items the user's persona was aligned on (0 when no nightly ran, or its state
    cannot be read here: a read-only store, say; answering never writes it)."""
    if not store.settings.state_db.exists():
        return 0
    try:
        state = StateStore.of(store.settings, task.key).get(user_id)
        return len(state.item_ids or ()) if state else 0
    except sqlite3.Error as err:
        logging.getLogger(__name__).warning("cannot read %s (%s): the history check is skipped",
                                            store.settings.state_db, err)
        return 0
