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

pytestmark = pytest.mark.slow  # a PostgreSQL cluster and a tracking server: the second tier

_spec = importlib.util.spec_from_file_location("pg_server", Path(__file__).parents[2] / "bench" / "pg_server.py")
pg = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(pg)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
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
    assert sorted(first.aligned + first.rejected) == users and not first.failed
    registry = PersonaRegistry(LAMP_2M, server)
    for user in users:
        versions = registry.versions(user)
        keys = collections.Counter((v.tags.get("fingerprint"), v.tags.get("iteration")) for v in versions)
        assert keys and max(keys.values()) == 1, (user, keys)  # no version registered twice
        assert registry.production_version(user) is not None
    assert settings.states(LAMP_2M.key).pending() == {}  # every commit recorded its state
    again = run_nightly(replace(settings, committers=1), LAMP_2M)
    assert again.lm_calls == 0 and again.counts()["users_unchanged"] == 8
