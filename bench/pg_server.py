"""A throwaway PostgreSQL cluster and an `mlflow server` on it, as a team deploys MLflow: for the
benches and the tests that commit to a tracking server.

    with postgres() as backend, mlflow_server(backend, artifacts) as url: ...

`backend.stop()` and `backend.start()` stop and start the cluster (a restart under a night).

`postgres()` runs `initdb` and `pg_ctl` in a temporary directory on a free local port (as the
`postgres` user when run as root: PostgreSQL refuses root) and removes it afterwards.
`missing()` says why it cannot run here (no PostgreSQL 15+ binaries, no psycopg2), or None.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator


def _bin() -> Path | None:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    return found[-1].parent if found else (Path(shutil.which("initdb")).parent if shutil.which("initdb") else None)


def missing() -> str | None:
    if _bin() is None:
        return "PostgreSQL is not installed (no initdb)"
    try:
        import psycopg2  # noqa: F401  (MLflow's driver for postgresql:// URIs)
    except ImportError:
        return "psycopg2 is not installed (pip install -e '.[postgres]')"
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        return "running as root without runuser (PostgreSQL refuses to run as root)"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_postgres(cmd: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


class Postgres(str):
    """A running cluster's URI, which can also stop and start the cluster (a restart mid-night)."""

    def __new__(cls, uri: str, pg_ctl):
        self = super().__new__(cls, uri)
        self.pg_ctl = pg_ctl
        return self

    def stop(self) -> None:
        self.pg_ctl("-m", "fast", "stop")

    def start(self) -> None:
        self.pg_ctl("start")


@contextlib.contextmanager
def postgres(database: str = "mlflow") -> Iterator[Postgres]:
    """A PostgreSQL cluster with one database; yields its URI."""
    bin_, root, port = _bin(), Path(tempfile.mkdtemp(prefix="persona-agent-pg-")), free_port()
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
    run = lambda *cmd: subprocess.run(_as_postgres([str(bin_ / cmd[0]), *cmd[1:]]), check=True,  # noqa: E731
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    pg_ctl = lambda *args: run("pg_ctl", "-D", str(root / "data"), "-o",  # noqa: E731
                               f"-p {port} -k {root} -c listen_addresses=127.0.0.1", "-l", str(root / "log"), "-w",
                               *args)
    try:
        run("initdb", "-D", str(root / "data"), "-A", "trust", "-U", "postgres")
        pg_ctl("start")
        run("createdb", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", database)
        # SQLAlchemy 2.1 defaults to psycopg 3: the driver is named
        yield Postgres(f"postgresql+psycopg2://postgres@127.0.0.1:{port}/{database}", pg_ctl)
    finally:
        with contextlib.suppress(Exception):
            pg_ctl("-m", "fast", "stop")
        shutil.rmtree(root, ignore_errors=True)


@contextlib.contextmanager
def mlflow_server(backend: str, artifacts: Path, workers: int = 4) -> Iterator[str]:
    """`mlflow server` on `backend`, artifacts proxied to a folder; yields its URL."""
    port = free_port()
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                             "--backend-store-uri", backend, "--artifacts-destination", str(artifacts),
                             "--workers", str(workers)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 180  # the first start creates MLflow's schema
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"mlflow server did not start (exit {proc.poll()})") from None
                time.sleep(0.3)
        yield f"http://127.0.0.1:{port}"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 15)
        proc.wait(timeout=60)
