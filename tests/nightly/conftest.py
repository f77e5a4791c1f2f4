"""The tracking server the slow nightly tests commit to: `mlflow server` on a PostgreSQL cluster,
as a team deploys MLflow (bench/pg_server.py starts both, as a user would)."""

import pytest

from bench import pg_server as pg


@pytest.fixture
def team_server(tmp_path_factory):
    """(the PostgreSQL cluster, the server's URL): a fresh pair per test, so that their users
    (u0000, ...) never meet in one registry."""
    if why := pg.missing():
        pytest.skip(why)
    root = tmp_path_factory.mktemp("pg")
    with pg.postgres() as backend, pg.mlflow_server(backend, root / "artifacts") as url:
        yield backend, url


@pytest.fixture
def server(team_server):
    return team_server[1]
