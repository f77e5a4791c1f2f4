"""The nightly against the team deployment of MLflow: `mlflow server` on PostgreSQL, with several
commit processes writing at once (bench/pg_server.py starts both, as a user would)."""

import collections
import importlib.util
from dataclasses import replace
from pathlib import Path

import pytest

from persona_agent.data.synthetic import write_dataset
from persona_agent.data.tasks import LAMP_2M
from persona_agent.nightly.driver import run_nightly
from persona_agent.runtime.registry import PersonaRegistry
from persona_agent.runtime.settings import LMConfig, Settings

from ..helpers import ingest_into
from .test_crash import kill_again_and_again

pytestmark = pytest.mark.slow  # a PostgreSQL cluster and a tracking server: the second tier

_spec = importlib.util.spec_from_file_location("pg_server", Path(__file__).parents[2] / "bench" / "pg_server.py")
pg = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(pg)


@pytest.fixture
def server(tmp_path_factory):
    """A fresh cluster and server per test: their users (u0000, ...) must not meet in one registry."""
    if why := pg.missing():
        pytest.skip(why)
    root = tmp_path_factory.mktemp("pg")
    with pg.postgres() as backend, pg.mlflow_server(backend, root / "artifacts") as url:
        yield url


def test_parallel_committers_commit_every_user_once(server, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server)
    settings = Settings(store=tmp_path / "store", lm=LMConfig("scripted", cache=False), batch_size=2, iterations=2,
                        max_iters=1, workers=4, committers=3)
    ingest_into(settings, write_dataset(tmp_path / "data", LAMP_2M, n_users=8, n_history=6, n_queries=1, seed=6))
    first = run_nightly(settings, LAMP_2M)
    users = [f"u{i:04d}" for i in range(8)]
    assert not first.failed, first.failed  # each with its reason
    assert sorted(first.aligned + first.rejected) == users
    registry = PersonaRegistry(LAMP_2M, server)
    for user in users:
        versions = registry.versions(user)
        keys = collections.Counter((v.tags.get("fingerprint"), v.tags.get("iteration")) for v in versions)
        assert keys and max(keys.values()) == 1, (user, keys)  # no version registered twice
        assert registry.production_version(user) is not None
    assert settings.states(LAMP_2M.key).pending() == {}  # every commit recorded its state
    again = run_nightly(replace(settings, committers=1), LAMP_2M)
    assert again.lm_calls == 0 and again.counts()["users_unchanged"] == 8


def test_killed_committers_leave_no_duplicate_and_the_next_night_redoes_their_users(server, tmp_path, monkeypatch):
    """`ingest && nightly` with 3 commit processes on the server, killed (the whole process group,
    committers included) at random points again and again: after each kill no version is
    registered twice and every production persona is complete; the rerun aligns every user on
    their whole history."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server)
    kill_again_and_again(tmp_path, "--committers", "3", min_killed=2)  # 4 of 8 here: a night of 2 users is short
