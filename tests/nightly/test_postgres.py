"""The nightly against the team deployment of MLflow: `mlflow server` on PostgreSQL, with several
commit processes writing at once (bench/pg_server.py starts both, as a user would)."""

import collections
from dataclasses import replace

import pytest

from persona_agent.adapters.registry import PersonaRegistry
from persona_agent.adapters.state import StateStore
from persona_agent.data.synthetic import write_dataset
from persona_agent.data.tasks import LAMP_2M
from persona_agent.nightly.driver import run_nightly
from persona_agent.settings import LMConfig, Settings

from ..helpers import ingest_into
from .test_crash import kill_again_and_again

pytestmark = pytest.mark.slow  # a PostgreSQL cluster and a tracking server (`server`, conftest): the second tier


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
    assert StateStore.of(settings, LAMP_2M.key).pending() == {}  # every commit recorded its state
    again = run_nightly(replace(settings, committers=1), LAMP_2M)
    assert again.lm_calls == 0
    assert again.counts()["users_unchanged"] == 8


def test_killed_committers_leave_no_duplicate_and_the_next_night_redoes_their_users(server, tmp_path, monkeypatch):
    """`ingest && nightly` with 3 commit processes on the server, killed (the whole process group,
    committers included) at random points again and again: after each kill no version is
    registered twice and every production persona is complete; the rerun aligns every user on
    their whole history."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server)
    kill_again_and_again(tmp_path, "--committers", "3", min_killed=2)  # 4 of 8 here: a night of 2 users is short


def test_postgres_restarted_mid_night_fails_the_users_it_hit_named_and_the_next_night_redoes_them(
        team_server, tmp_path, monkeypatch):
    """PostgreSQL stops after the night's first commit and starts again after the first commit it
    broke (both from inside the driver's tally, so the outage always falls mid-night): the users
    whose commits hit it fail, each named with the error, nothing else is lost, and the next
    night commits exactly them, with no version registered twice."""
    from persona_agent.nightly import driver

    backend, server = team_server
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # a failed request fails now, not minutes later
    outage, tally = [], driver._tally

    def tally_across_an_outage(summary, outcome, version):
        row = tally(summary, outcome, version)
        if not outage:
            backend.stop()
            outage.append("stopped")
        elif isinstance(version, BaseException) and outage == ["stopped"]:
            backend.start()
            outage.append("started")
        return row

    monkeypatch.setattr(driver, "_tally", tally_across_an_outage)
    settings = Settings(store=tmp_path / "store", lm=LMConfig("scripted:0.1", cache=False), batch_size=2,
                        iterations=2, max_iters=1, workers=2, committers=2)
    users = [f"u{i:04d}" for i in range(10)]
    ingest_into(settings, write_dataset(tmp_path / "data", LAMP_2M, n_users=len(users), n_history=6, n_queries=1,
                                        seed=9))
    first = run_nightly(settings, LAMP_2M)
    assert outage == ["stopped", "started"]
    assert first.failed and all(why.startswith("commit failed: ") for why in first.failed.values()), first.failed
    assert sorted(first.aligned + first.rejected + list(first.failed)) == users
    states = StateStore.of(settings, LAMP_2M.key)
    assert set(states.pending()) == set(first.failed)  # the committed ones are done, the failed ones left

    monkeypatch.setattr(driver, "_tally", tally)
    second = run_nightly(settings, LAMP_2M)
    assert not second.failed
    assert sorted(second.aligned + second.rejected) == sorted(first.failed)
    registry = PersonaRegistry(LAMP_2M, server)
    for user in users:
        keys = collections.Counter((v.tags.get("fingerprint"), v.tags.get("iteration"))
                                   for v in registry.versions(user))
        assert keys and max(keys.values()) == 1, (user, keys)  # no version registered twice
        assert registry.get(user).version == states.get(user).version
    assert states.pending() == {}
