"""The nightly job's units: plan the users whose history changed, align one (anywhere), commit one.

The work for one user is a pure function (`align_job`: memory items + current persona in,
candidate revisions out), so it runs the same in a thread or on a remote worker. Committing is
two writes: the registry's (`publish`: versions, the production alias), done by the commit
processes or, on a Ray cluster with a tracking server, by the worker that aligned the user; and
the user's state row, written last by whoever holds the store (`commit`, or the driver).

Crash safety, without a transaction spanning MLflow and the state rows:
- a user is done when their state row (one SQLite transaction, written last) holds the
  fingerprint of the history they were aligned on; until then a rerun redoes them;
- redoing is cheap and exact: DSPy's disk cache answers the replayed LM calls, and revisions are
  registered only if no version with the same (fingerprint, iteration) tags exists, so a rerun
  adds no duplicate versions and moves `production` to the same version.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from enum import Enum

import dspy

from persona_agent.adapters import tracking
from persona_agent.adapters.lm_cache import owned_by
from persona_agent.adapters.points import open_memory
from persona_agent.adapters.registry import PersonaNotFound
from persona_agent.adapters.state import StateStore, UserState
from persona_agent.data.loaders import Query
from persona_agent.data.tasks import Task
from persona_agent.optimizers import AlignmentStep
from persona_agent.pipelines.agent import non_personalized
from persona_agent.pipelines.flow import examples, score
from persona_agent.pipelines.memory import EpisodicMemory, MemoryItem
from persona_agent.pipelines.metering import metered
from persona_agent.pipelines.persona import Persona
from persona_agent.pipelines.points import StoreDamaged
from persona_agent.runtime.wiring import alignment, user_flow
from persona_agent.settings import Settings

log = logging.getLogger(__name__)


def fingerprint(items: list[MemoryItem]) -> str:
    """Changes exactly when the user's history does: an item added, or one corrected in place."""
    rows = sorted(json.dumps([it.item_id, it.text, it.response, it.date]) for it in items)
    return hashlib.sha256("\n".join(rows).encode()).hexdigest()[:16]


@dataclass
class UserJob:
    user_id: str
    items: list[MemoryItem]
    fingerprint: str
    persona_profile: str | None  # the production persona's profile; None for a new user
    seen_ids: frozenset[str] | None = None  # the items production was aligned on; None: not known
    version: int | None = None  # the production version (the one prequential scoring tests)
    scores: list[dict] = field(default_factory=list)  # earlier nights' scores: {night, version, score, n}
    mark: int = 0  # the change to the user's memory this job consumes (`StateStore.pending`)


@dataclass
class Prequential:
    """Test, then align: last night's production persona on the interactions that arrived since
    (which it has never seen), beside the non-personalized baseline on the same items."""

    item_ids: list[str]
    golds: list[str]
    production: list[str | None]
    non_personalized: list[str | None]
    lm_calls: int = 0
    version: int | None = None  # the production version that answered

    def mean(self, task: Task) -> float:
        """Production's mean per-interaction score (1 = right; ratings: 1 - |error| / 4)."""
        return sum(task.example_score(g, a) for g, a in zip(self.golds, self.production)) / len(self.golds)


@dataclass
class UserOutcome:
    user_id: str
    fingerprint: str
    status: "Status"
    semantic_profile: str = ""
    start_profile: str = ""
    steps: list[AlignmentStep] = field(default_factory=list)
    lm_calls: int = 0
    tokens: int = 0
    fallbacks: int = 0  # unusable LM answers replaced by a default (counted, logged)
    error: str = ""
    item_ids: list[str] = field(default_factory=list)  # the history aligned on (tomorrow's `seen_ids`)
    cache_hits: int = 0  # of lm_calls, answered from DSPy's cache (no tokens spent)
    trace_id: str | None = None  # the user's trace, when the night is traced (linked to its run on commit)
    prequential: Prequential | None = None
    rollback_to: int | None = None  # production regressed: the last version that scored better
    mark: int = 0  # the change the job consumed: recorded as `seen` when it is committed
    worker: str = ""  # where it was aligned (a Ray node and process), when not in the driver
    published: "Published | None" = None  # what the worker published (`publish`), where it publishes

    def __post_init__(self):
        self.status = Status(self.status)  # "aligned" reads as Status.ALIGNED; a word no status has fails here


class Status(str, Enum):
    """How a user's night ended. Its value is the word `users.csv`, the state row and the log use."""

    ALIGNED = "aligned"
    REJECTED = "rejected"  # no rewrite accepted: production unchanged
    ROLLED_BACK = "rolled back"  # production regressed: moved back to the last version that scored better
    FAILED = "failed"  # kept production; retried next run
    DEFERRED = "deferred"  # a budget cut it off before it started; planned again next run
    INTERRUPTED = "interrupted"  # a stop signal came first; planned again next run

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class Published:
    """What publishing one user did (`publish`): the production version it left, the state row
    that marks the user done (None: nothing to record), or the error that kept it from publishing."""

    version: int | None
    state: UserState | None = None
    error: str = ""


def fell(score: float, before: list[float]) -> bool:
    """A regression: `score` below the mean of the scores `before` it (the nightly rollback and
    `report` use this one rule)."""
    return bool(before) and score < sum(before) / len(before)


def last_better(scores: list[dict], tonight: dict, k: int) -> int | None:
    """When tonight's score of production is below its mean over the (up to) `k` scored nights
    before, the latest version of those nights that scored above tonight's; else None."""
    before = scores[-k:] if k > 0 else []
    if not fell(tonight["score"], [s["score"] for s in before]):
        return None
    better = [s["version"] for s in before if s["score"] > tonight["score"] and s["version"] not in (None, tonight["version"])]
    return better[-1] if better else None


def prequential(job: UserJob, task: Task, settings: Settings) -> Prequential | None:
    """Score the production persona on the user's newest unseen interactions (at most
    `settings.score_max`) before they enter its memory or an alignment batch: the agent here
    remembers only the items production was aligned on. None for a new user, a user whose
    state predates this, or nothing new."""
    if job.persona_profile is None or job.seen_ids is None or settings.score_max == 0:
        return None
    new = {it.item_id for it in job.items} - job.seen_ids
    asked = [ex for ex in examples(task, job.items) if ex.item_id in new][-settings.score_max:]
    if not asked:
        return None
    queries = [Query(ex.item_id, ex.query, ex.answer) for ex in asked]
    memory = open_memory(":memory:")
    try:
        with metered() as cost:
            seen = [it for it in job.items if it.item_id in job.seen_ids]
            flow = user_flow(settings, task, job.user_id, history=seen, memory=memory)
            flow.remember()
            production = flow.agent(Persona(task, job.persona_profile), semantic=job.persona_profile)
            ours = score(production, task, queries).answers
            baseline = score(non_personalized(task), task, queries).answers
        return Prequential([q.id for q in queries], [q.gold for q in queries], ours, baseline, cost.lm_calls,
                           job.version)
    finally:
        memory.close()


def align_job(job: UserJob, task: Task, settings: Settings) -> UserOutcome:
    """Refresh semantic memory and align one user, from the items alone (uses the LM in
    `dspy.settings`). Never raises: a failure is an outcome, and the user keeps their persona."""
    memory = open_memory(":memory:")  # the job's own copy: workers never open the store
    try:
        with metered() as cost, owned_by(job.user_id):  # its cached answers are the user's
            scored = prequential(job, task, settings)
            flow = user_flow(settings, task, job.user_id, history=job.items, memory=memory)
            flow.remember()
            semantic = flow.profile()
            start = job.persona_profile if job.persona_profile is not None else semantic
            student = flow.agent(Persona(task, start))
            steps = flow.align(alignment(settings), student).alignment_steps
        accepted = any(s.accepted for s in steps)
        rollback = None
        if scored is not None and settings.rollback_after:
            tonight = {"version": scored.version, "score": scored.mean(task)}
            rollback = last_better(job.scores, tonight, settings.rollback_after)
        status = Status.ROLLED_BACK if rollback is not None else Status.ALIGNED if accepted else Status.REJECTED
        return UserOutcome(job.user_id, job.fingerprint, status, semantic,
                           student.persona.profile, steps, cost.lm_calls, cost.tokens, cost.fallbacks,
                           item_ids=[it.item_id for it in job.items], prequential=scored, rollback_to=rollback,
                           cache_hits=cost.cache_hits)
    except Exception as err:  # one user's failure must not stop the others
        log.warning("user %s: alignment failed: %s", job.user_id, str(err)[:300])
        return UserOutcome(job.user_id, job.fingerprint, Status.FAILED, error=f"{type(err).__name__}: {str(err)[:300]}")
    finally:
        memory.close()


DAMAGED = ("history shrank: {missing} of {had} items aligned on are missing from memory; the store may be "
           "damaged (restore it from a backup); {user} keeps their persona and is not re-aligned")


def plan(memory: EpisodicMemory, states: StateStore, registry,
         *, full: bool = False) -> tuple[list[UserJob], list[str], dict[str, str], int]:
    """Jobs for users whose history changed since their last completed alignment; the users
    read and found unchanged; those that could not be planned (user id -> error), who are left
    as they are; and how many users aligned before were not read at all (nothing changed).

    Only users with a change this task has not committed are read (`StateStore.pending`: marked
    by `ingest`, or left by a failed, deferred or interrupted run); `full` reads every user in
    memory instead (memory written by something other than `ingest`)."""
    jobs, unchanged, failed, seen = [], [], {}, {}
    states.ready(memory.user_ids)
    known = 0  # users aligned before that were read (or failed) tonight: the rest are untouched
    if full:  # every user in memory; and one aligned before with no memory at all is damage
        in_memory = set(memory.user_ids())
        for user_id in sorted(states.user_ids() - in_memory):
            failed[user_id] = DAMAGED.format(missing="all", had="the", user=user_id)
            known += 1  # counted as failed, so not as untouched too
        pending = dict.fromkeys(in_memory, states.latest())
    else:
        pending = states.pending()
    for user_id, mark in sorted(pending.items()):
        try:
            items = memory.items(user_id)
            state = states.get(user_id)
            known += state is not None
            if not items:  # marked, but no memory: aligned before means the store lost it
                if state and state.item_ids:
                    failed[user_id] = DAMAGED.format(missing="all", had=len(state.item_ids), user=user_id)
                elif state:
                    seen[user_id] = mark
                continue
            fp = fingerprint(items)
            if state and state.fingerprint == fp:
                unchanged.append(user_id)
                seen[user_id] = mark
                continue
            # Nothing deletes a memory (ingest adds or replaces by id): an item aligned on that is
            # gone means a damaged store, and aligning on what is left would write a wrong persona.
            missing = set(state.item_ids or () if state else ()) - {it.item_id for it in items}
            if missing:
                failed[user_id] = DAMAGED.format(missing=len(missing), had=len(state.item_ids), user=user_id)
                log.warning("user %s: %s", user_id, failed[user_id])
                continue
            try:  # one read of the registry: the production version with its persona
                production = registry.get(user_id)
            except PersonaNotFound:
                production = None
            current, profile = (production.version, production.persona.profile) if production else (None, None)
            seen_ids = frozenset(state.item_ids) if state and state.item_ids is not None and current is not None else None
            jobs.append(UserJob(user_id, items, fp, profile, seen_ids, current, list(state.scores) if state else [], mark))
        except StoreDamaged:  # the shard, not this user: nobody aligns on a store known to be damaged
            raise
        except Exception as err:  # e.g. a production persona that no longer parses: skip this user only
            log.warning("user %s: cannot plan: %s", user_id, str(err)[:300])
            failed[user_id] = f"planning failed: {type(err).__name__}: {str(err)[:300]}"
    states.saw(seen)
    return jobs, unchanged, failed, states.count() - known


def work(job: UserJob, task: Task, settings: Settings, *, lm: dspy.LM, adapter: dspy.Adapter,
         registry=None, run_id: str | None = None, night: int = 0) -> UserOutcome:
    """Align one user with `lm` (in a trace, when the command traces) and, given a `registry`
    (a worker that publishes: a Ray actor beside a tracking server), publish them there: the one
    function the driver's threads and the Ray actors run. A user's own failure is an outcome."""
    with dspy.context(lm=lm, adapter=adapter), \
            tracking.trace(f"nightly {job.user_id}", user=job.user_id, task=task.key, method="persona-agent",
                           persona_version=job.version) as traced:
        outcome = align_job(job, task, settings)
    outcome.trace_id = next(iter(traced), None)
    if registry is not None:
        try:
            outcome.published = publish(outcome, task, registry, run_id=run_id, night=night, scores=job.scores)
        except Exception as err:  # the user keeps production and is redone next night
            outcome.published = Published(None, error=f"{type(err).__name__}: {str(err)[:300]}")
    return outcome


def commit(outcome: UserOutcome, task: Task, registry, *, states: StateStore, run_id: str | None = None,
           night: int = 0) -> int | None:
    """Publish the outcome (`publish`), then mark the user done: their state row, written last.
    Returns the production version."""
    before = states.get(outcome.user_id)
    published = publish(outcome, task, registry, run_id=run_id, night=night,
                        scores=list(before.scores) if before else [])
    if published.state is not None:
        states.put(outcome.user_id, published.state, seen=outcome.mark)
    return published.version


def publish(outcome: UserOutcome, task: Task, registry, *, run_id: str | None, night: int,
            scores: list[dict]) -> Published:
    """Register the outcome's revisions (skipping any a crashed run already registered), move
    `production` (back to `rollback_to` when production regressed: tonight's candidates stay
    registered, unpromoted). Returns the production version and the state row that marks the
    user done (none for a failed outcome). Registry writes only: it runs wherever the tracking
    store is reachable (a Ray worker), and whoever holds the state writes the row."""
    if outcome.status is Status.FAILED:
        return Published(registry.production_version(outcome.user_id))  # kept; retried next run
    versions = registry.versions(outcome.user_id)
    existing = {(v.tags.get("fingerprint"), v.tags.get("iteration")): int(v.version) for v in versions}
    base = {"fingerprint": outcome.fingerprint, "run_id": run_id or "", "stage": "nightly"}
    production = serving = registry.production_version(outcome.user_id) if versions else None
    if production is None:  # a new user: their first persona comes from semantic memory
        key = (outcome.fingerprint, "0")
        # served at once: if the rest of this commit is interrupted, the user has this one
        production = existing.get(key) or registry.register(
            outcome.user_id, Persona(task, outcome.start_profile), "initial persona from the profile",
            tags={**base, "iteration": 0, "accepted": True}, production=True, new=not versions)
        serving = production if key not in existing else None
    for step in outcome.steps:
        if not step.wrote_candidate:
            continue
        key = (outcome.fingerprint, str(step.iteration + 1))
        version = existing.get(key) or registry.register(
            outcome.user_id, Persona(task, step.profile_after), f"nightly iteration {step.iteration + 1}: {step.reason}",
            tags={**base, "iteration": step.iteration + 1, "accepted": step.accepted, "reason": step.reason,
             "batch_score": f"{step.batch_score:.3f}", "lm_calls": step.lm_calls, "tokens": step.tokens})
        if step.accepted:
            production = version
    if outcome.prequential is not None:  # (a rerun of the same night replaces its entry)
        scores = [s for s in scores if s["night"] != night] + [
            {"night": night, "version": outcome.prequential.version, "score": outcome.prequential.mean(task),
             "n": len(outcome.prequential.golds)}]
    if outcome.rollback_to is not None:
        for key, value in {"rolled_back_at_night": night, "rolled_back_from": outcome.prequential.version}.items():
            registry.tag(outcome.user_id, outcome.rollback_to, key, value=value)
        production = outcome.rollback_to
    if production != serving:
        registry.promote(outcome.user_id, production)
    return Published(production, UserState(outcome.fingerprint, production, outcome.status.value,
                                           tuple(outcome.item_ids), outcome.semantic_profile, tuple(scores),
                                           time.time()))


@dataclass
class NightlySummary:
    aligned: list[str] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)  # read tonight, and found unchanged
    untouched: int = 0  # aligned before, and not read tonight: no change was marked for them
    failed: dict[str, str] = field(default_factory=dict)
    interrupted: list[str] = field(default_factory=list)  # planned, not finished: a stop came first
    deferred: dict[str, str] = field(default_factory=dict)  # user -> which budget: aligned on a later night
    rolled_back: dict[str, tuple[int | None, int]] = field(default_factory=dict)  # user -> (from, to)
    stopped_by: str | None = None  # "SIGINT" or "SIGTERM"
    scored: dict[str, Prequential] = field(default_factory=dict)  # user -> tonight's prequential scoring
    night: int = 0  # this task's nightly runs on the store so far, this one included (the metric step)
    run_id: str = ""  # the night's MLflow run
    lm_calls: int = 0
    tokens: int = 0
    fallbacks: int = 0
    seconds: float = 0.0
    driver_seconds: float = 0.0  # planning and tallying: the driver's own work, not the users' or the commits'
    driver_cpu_seconds: float = 0.0  # the same spans' CPU time of the driver's thread (no waits for the GIL)

    def counts(self) -> dict[str, float]:
        return {"users_aligned": len(self.aligned), "users_rejected": len(self.rejected),
                "users_unchanged": len(self.unchanged) + self.untouched, "users_failed": len(self.failed),
                "users_interrupted": len(self.interrupted), "users_deferred": len(self.deferred),
                "users_rolled_back": len(self.rolled_back),
                "lm_calls": self.lm_calls, "tokens": self.tokens, "lm_fallbacks": self.fallbacks,
                "wall_seconds": self.seconds}

    def quality(self, task: Task) -> dict[str, float]:
        """Tonight's prequential scores, pooled over users: production persona vs non-personalized."""
        runs = list(self.scored.values())
        golds = [g for p in runs for g in p.golds]
        if not golds:
            return {"prequential_items": 0}
        metric = task.metric_names[0]
        return {"prequential_items": len(golds), "prequential_lm_calls": sum(p.lm_calls for p in runs),
                f"prequential_production_{metric}": task.score(golds, [a for p in runs for a in p.production])[metric],
                f"prequential_non_personalized_{metric}":
                    task.score(golds, [a for p in runs for a in p.non_personalized])[metric]}

