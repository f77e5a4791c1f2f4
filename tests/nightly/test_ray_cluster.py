"""A night on a two-node Ray cluster on this machine (`ray.cluster_utils.Cluster`), the workers
committing their own users to `mlflow server` on PostgreSQL (`server`, conftest); one worker is
killed mid-night."""

import collections
import io
import signal
import subprocess
import threading
import time

import pandas as pd
import pytest

from persona_agent.adapters.registry import PersonaRegistry
from persona_agent.adapters.state import StateStore
from persona_agent.data.synthetic import write_dataset
from persona_agent.data.tasks import LAMP_2M
from persona_agent.nightly import driver
from persona_agent.nightly.committer import Committer
from persona_agent.nightly.driver import run_nightly
from persona_agent.settings import LMConfig, Settings

from ..helpers import ingest_into

pytestmark = pytest.mark.slow  # a Ray cluster, a PostgreSQL cluster and a tracking server: the second tier

USERS = [f"u{i:04d}" for i in range(10)]


@pytest.fixture
def ray_cluster():
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    if ray.is_initialized():  # a local instance an earlier test's night started (`ray_outcomes`)
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


def _kill_a_working_actor(nodes: set, stop: threading.Event, killed: list) -> None:
    """Once both nodes have committed a user, SIGKILL one actor process that is aligning users."""
    while not stop.is_set() and len(nodes) < 2:
        time.sleep(0.05)
    while not stop.is_set():
        busy = subprocess.run(["pgrep", "-f", "ray::_RayAligner.align"], capture_output=True, text=True, check=False)
        pids = busy.stdout.split()
        if pids:
            subprocess.run(["kill", f"-{signal.SIGKILL.value}", pids[0]], check=False)  # it may have just exited
            killed.append(pids[0])
            return
        time.sleep(0.05)


def _users_csv(server: str, run_id: str) -> pd.DataFrame:
    import mlflow

    mlflow.set_tracking_uri(server)
    return pd.read_csv(io.StringIO(mlflow.artifacts.load_text(f"runs:/{run_id}/users.csv")))


def test_a_night_on_two_ray_nodes_with_a_worker_killed(ray_cluster, server, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server)
    # the workers publish: the driver's commit process is never used (a call here fails the user)
    monkeypatch.setattr(Committer, "submit", lambda *a: pytest.fail("the driver committed a user"))
    settings = Settings(store=tmp_path / "store", lm=LMConfig("scripted:0.05", cache=False), batch_size=2,
                        iterations=2, max_iters=1, workers=4)
    ingest_into(settings, write_dataset(tmp_path / "data", LAMP_2M, n_users=len(USERS), n_history=6, n_queries=1,
                                        seed=8))
    states, stop, killed, nodes, tally = StateStore.of(settings, LAMP_2M.key), threading.Event(), [], set(), driver._tally

    def tally_noting_the_node(summary, outcome, version):
        if outcome.worker and not isinstance(version, BaseException):
            nodes.add(outcome.worker.split("/")[0])
        return tally(summary, outcome, version)

    monkeypatch.setattr(driver, "_tally", tally_noting_the_node)
    killer = threading.Thread(target=_kill_a_working_actor, args=(nodes, stop, killed))
    killer.start()
    try:
        first = run_nightly(settings, LAMP_2M, executor="ray")
    finally:
        stop.set()
        killer.join()
    assert len(nodes) == 2, nodes  # both nodes aligned and published users
    assert killed, "the night ended before an actor could be killed"
    # the killed worker's users failed, named, and kept what they had; the others committed
    assert first.failed and all("Actor" in why for why in first.failed.values()), first.failed
    assert sorted(first.aligned + first.rejected + list(first.failed)) == USERS
    rows = _users_csv(server, first.run_id).set_index("user_id")
    assert {w.split("/")[0] for w in rows["worker"].dropna()} == nodes  # users.csv names each user's worker
    assert (rows.loc[list(first.failed), "status"] == "failed").all()

    registry = PersonaRegistry(LAMP_2M, server)

    def each_version_once():
        for user in USERS:
            keys = collections.Counter((v.tags.get("fingerprint"), v.tags.get("iteration"))
                                       for v in registry.versions(user))
            assert not keys or max(keys.values()) == 1, (user, keys)

    each_version_once()
    assert set(states.pending()) == set(first.failed)  # exactly the failed users are left for next night

    second = run_nightly(settings, LAMP_2M, executor="ray")
    assert not second.failed
    assert sorted(second.aligned + second.rejected) == sorted(first.failed)
    each_version_once()
    assert states.pending() == {}
    for user in USERS:
        assert registry.get(user).version == states.get(user).version  # production parses, state agrees
