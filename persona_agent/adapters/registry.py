"""Personas in MLflow's prompt registry: every revision a version, `production` the one in use.

One prompt per (task, user). Versions are immutable; accepted and rejected revisions are both
registered (tag `accepted`), and only the alias `production` says which one serves. Rolling
back is moving the alias: nothing is ever deleted or rewritten.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import logging
import re
from dataclasses import dataclass

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, RESOURCE_DOES_NOT_EXIST, ErrorCode

from persona_agent.data.tasks import Task
from persona_agent.overrides import forget_cached_alias, registry_client
from persona_agent.pipelines.persona import Persona, profile_problem

log = logging.getLogger(__name__)

PRODUCTION = "production"
LINKED_PROMPTS, MAX_TAG = "mlflow.linkedPrompts", 8000  # the run tag of a run's prompt links, and MLflow's limit
PRODUCTION_TAG = "production_version"
HISTORY_COLUMNS = ["version", "production", "stage", "iteration", "accepted", "batch_score", "candidate_score",
                   "lm_calls", "tokens", "reason", "message"]


def prompt_name(task_key: str, user_id: str) -> str:
    """Registry names allow letters, digits, '-', '_' and '.'; user ids may hold anything. The
    readable part is the id made safe; the hash of the whole id keeps names unique, also
    against an id crafted to look like another id's safe form."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", user_id)[:64]
    return f"persona.{task_key}.{safe}-{hashlib.sha256(user_id.encode()).hexdigest()[:16]}"


class PersonaNotFound(LookupError):
    pass


@dataclass(frozen=True)
class Revision:
    version: int
    persona: Persona
    tags: dict
    message: str


class PersonaRegistry:
    """The prompt registry at `tracking_uri` (default: MLflow's current one), seen as per-user personas."""

    def __init__(self, task: Task, tracking_uri: str | None = None):
        self.task = task
        self.client = mlflow.MlflowClient(tracking_uri)
        self._registry = registry_client(self.client)

    def name(self, user_id: str) -> str:
        return prompt_name(self.task.key, user_id)

    def register(self, user_id: str, persona: Persona, message: str, *, tags: dict | None = None,
                 production: bool = False, new: bool = False) -> int:
        """Add a revision; with `production`, also make it the one that serves. `new`: the caller
        found the user has no versions, so the prompt is created first, not looked for."""
        tags = {"user_id": user_id, "task": self.task.key, **{k: str(v) for k, v in (tags or {}).items()}}
        name, template = self.name(user_id), persona.render()
        if new:
            self._create_prompt(name, user_id)
        try:
            # A new version through the registry's own prompt-version call: `register_prompt`
            # would also look the prompt up twice and copy each of the ~11 version tags onto the
            # prompt, a database write apiece (most of a nightly commit's CPU: bench/nightly_throughput.py).
            version = self._registry.create_prompt_version(name, template, description=message, tags=tags).version
        except MlflowException as err:
            if err.error_code != ErrorCode.Name(RESOURCE_DOES_NOT_EXIST):
                raise
            self._create_prompt(name, user_id)
            version = self._registry.create_prompt_version(name, template, description=message, tags=tags).version
        if tags.get("run_id"):  # the run page lists the versions it registered ("Registered prompts")
            self._link(name, version, tags["run_id"])
        if production:
            self.promote(user_id, version)
        return int(version)

    def _create_prompt(self, name: str, user_id: str) -> None:
        """The user's prompt, tagged with whose it is (the prompt list shows these tags); one that
        exists already (a crashed commit made it) is fine."""
        try:
            self._registry.create_prompt(name, tags={"user_id": user_id, "task": self.task.key})
        except MlflowException as err:
            if err.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
                raise

    def _link(self, name: str, version, run_id: str) -> None:
        """MLflow keeps a run's prompt links in one tag, cut at 8,000 characters (about 60 links),
        after which every further link fails to parse it: a night of many users links the first
        ones only (its users.csv lists every user's version)."""
        linked = self.client.get_run(run_id).data.tags.get(LINKED_PROMPTS, "")
        if len(linked) + len(name) + 40 > MAX_TAG:
            log.info("run %s: not linking %s v%s: the run's prompt links are full", run_id, name, version)
            return
        try:
            self._registry.link_prompt_version_to_run(name, str(version), run_id)
        except MlflowException as err:
            # MLflow links by reading, extending and writing back that one tag, locked only inside
            # a process: parallel committers can collide on it (on PostgreSQL, two first writes of
            # the tag: a unique violation). The link is the run page's list, not the commit: the
            # version is registered, `production` and the state still follow, users.csv lists it.
            log.warning("run %s: %s v%s registered but not linked on the run page (%s)", run_id, name, version,
                        str(err)[:200])

    def promote(self, user_id: str, version: int) -> None:
        """Point `production` at `version`, a version known to exist and to pass the profile check
        (just registered by the caller, or checked by `rollback`): no re-read of the version."""
        self._registry.set_prompt_alias(self.name(user_id), PRODUCTION, int(version))
        forget_cached_alias(self.client, self.name(user_id), PRODUCTION)
        # the prompt list shows a prompt's tags, not its aliases: there, production is this tag
        self._registry.set_prompt_tag(self.name(user_id), PRODUCTION_TAG, str(version))

    def tag(self, user_id: str, version: int, key: str, *, value) -> None:
        self.client.set_prompt_version_tag(self.name(user_id), str(version), key, str(value))

    def rollback(self, user_id: str, version: int, force: bool = False) -> None:
        """Serve `version` again. Refuses unknown versions and ones whose profile fails today's
        profile check (instructions, junk, no preference in the task's terms: a rejected candidate);
        `force` serves one anyway (a persona of an earlier release, say), tagged `forced` with the
        reason, and logged."""
        persona = self.get(user_id, version).persona
        # the empty profile (a refused first profile's placeholder) is what a new user is served: safe
        problem = profile_problem(persona.known, task=self.task) if persona.known else None
        if problem and not force:
            raise ValueError(f"version {version} of {user_id!r} cannot serve: its profile fails the profile "
                             f"check ({problem}); --force serves it anyway")
        if problem:
            log.warning("%s: version %d serves although its profile fails the check (%s): forced", user_id, version,
                        problem)
            self.tag(user_id, version, "forced", value=problem)
        self.promote(user_id, version)

    def get(self, user_id: str, version: int | None = None) -> Revision:
        """A version, or the production one when `version` is None."""
        name = self.name(user_id)
        try:
            pv = (self.client.get_prompt_version(name, str(version)) if version is not None
                  else self.client.get_prompt_version_by_alias(name, PRODUCTION))
        except Exception as err:  # MLflow raises its own exception types for a missing prompt
            pv = None
            cause = err
        if pv is None:
            what = f"version {version}" if version is not None else f"{PRODUCTION} version"
            raise PersonaNotFound(f"{self.task.key} user {user_id!r} has no {what} in the registry") from cause
        return Revision(int(pv.version), Persona.parse(self.task, pv.template), dict(pv.tags), pv.commit_message or "")

    def production_version(self, user_id: str) -> int | None:
        try:
            return self.get(user_id).version
        except PersonaNotFound:
            return None

    def versions(self, user_id: str) -> list:
        """The user's prompt versions (empty when they have none)."""
        try:
            return list(_pages(self.client.search_prompt_versions, self.name(user_id)))
        except MlflowException as err:  # MLflow raises when the prompt does not exist yet
            # and only then: "none" read from a failed request would make an existing user new
            # (a commit would register and serve an initial persona over their production)
            if err.error_code == ErrorCode.Name(RESOURCE_DOES_NOT_EXIST):
                return []
            raise

    def history(self, user_id: str) -> pd.DataFrame:
        """Every version of the user's persona with its scores and cost, oldest first."""
        current = self.production_version(user_id)
        rows = []
        for pv in self.versions(user_id):
            tags = pv.tags
            rows.append({"version": int(pv.version), "production": int(pv.version) == current,
                         **{k: tags.get(k) for k in HISTORY_COLUMNS[2:-1]}, "message": pv.commit_message})
        return pd.DataFrame(rows, columns=HISTORY_COLUMNS).sort_values("version", ignore_index=True)

    def diff(self, user_id: str, v1: int, v2: int) -> str:
        a, b = self.get(user_id, v1).persona.render(), self.get(user_id, v2).persona.render()
        return "\n".join(difflib.unified_diff(a.splitlines(), b.splitlines(), f"v{v1}", f"v{v2}", lineterm=""))

    def delete(self, user_id: str) -> int:
        """Delete the user's prompt and every version of it (`forget`); returns the versions deleted."""
        name, versions = self.name(user_id), self.versions(user_id)
        for pv in versions:
            self.client.delete_prompt_version(name, str(pv.version))
        with contextlib.suppress(MlflowException):  # none: already forgotten
            self.client.delete_prompt(name)
        forget_cached_alias(self.client, name, PRODUCTION)
        return len(versions)

    def first_served(self) -> str | None:
        """A user with a production persona, or None: reads prompts only until it finds one."""
        for prompt in _pages(self.client.search_prompts, filter_string=f"name LIKE 'persona.{self.task.key}.%'"):
            versions = list(_pages(self.client.search_prompt_versions, prompt.name))
            user = versions[0].tags.get("user_id") if versions else None
            if user is not None and self.production_version(user) is not None:
                return user
        return None

    def users(self) -> pd.DataFrame:
        """One row per user: prompt name, versions, production version."""
        rows = []
        for prompt in _pages(self.client.search_prompts, filter_string=f"name LIKE 'persona.{self.task.key}.%'"):
            versions = list(_pages(self.client.search_prompt_versions, prompt.name))
            user = versions[0].tags.get("user_id") if versions else None
            prod = next((int(v.version) for v in versions if PRODUCTION in (getattr(v, "aliases", None) or [])), None)
            rows.append({"user_id": user, "prompt": prompt.name, "versions": len(versions),
                         "production": prod if prod is not None else self.production_version(user)})
        return pd.DataFrame(rows, columns=["user_id", "prompt", "versions", "production"])


def _pages(search, *args, **kwargs):
    """Every item of a paged MLflow search."""
    token = None
    while True:
        page = search(*args, **kwargs, max_results=1000, page_token=token)
        yield from page
        token = page.token
        if not token:
            return
