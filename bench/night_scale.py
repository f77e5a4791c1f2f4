"""What a night costs as users grow, with the scripted LLM (no LLM time at all).

    python bench/night_scale.py --users 1000 [--workers 4] [--json]

On a fresh store of N synthetic users (4 interactions each, ingested as `persona-agent ingest`
does): the first night (users per second); the driver's own milliseconds per aligned user
(planning and tallying; the users' alignment and the commits, done by workers and the commit
process, excluded), in wall time and in its thread's CPU time (with threads as workers, the
wall time also holds the driver's waits for the interpreter lock they hold); a night with
nothing new (seconds); a night after 1% of the users got one new interaction each (seconds);
commit throughput: users per second through `jobs.commit` on the store's SQLite (one writer),
and through 1, 2 and 4 commit processes (`Committer`) against an `mlflow server` on PostgreSQL,
which the bench starts (`commit_users_per_s` maps committers to it; `--skip-postgres` leaves it
out). `--json` prints one object last with the keys `users`, `first_night_users_per_s`,
`driver_ms_per_user`, `no_change_night_s`, `one_percent_night_s`, `commit_users_per_s` (and
`driver_cpu_ms_per_user` and a few more).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.pop("MLFLOW_TRACKING_URI", None)

import mlflow  # noqa: E402

from persona_agent.adapters.points import open_memory
from persona_agent.adapters.state import StateStore
from persona_agent.data.synthetic import write_dataset  # noqa: E402
from persona_agent.data.tasks import LAMP_2M  # noqa: E402
from persona_agent.nightly.driver import run_nightly  # noqa: E402
from persona_agent.pipelines.ingest import ingest  # noqa: E402
from persona_agent.pipelines.memory import MemoryItem  # noqa: E402
from persona_agent.settings import LMConfig, Settings  # noqa: E402


def _ingest(settings: Settings, source) -> None:
    memory = open_memory(path=str(settings.qdrant_path))
    try:
        if isinstance(source, Path):
            ingest(memory, source, LAMP_2M, mark_changed=StateStore.of(settings, LAMP_2M.key).mark_changed)
        else:  # {user: [items]}: what an ingest of new events writes
            from persona_agent.pipelines.ingest import remember_new

            remember_new(memory, source, StateStore.of(settings, LAMP_2M.key).mark_changed)
    finally:
        memory.close()


def _night(settings: Settings):
    started = time.perf_counter()
    summary = run_nightly(settings, LAMP_2M)
    return summary, time.perf_counter() - started


def _commit_rate(settings: Settings, n: int = 100) -> float:
    """Users per second through `jobs.commit`, what the commit process runs per user: a new user's
    initial persona, one accepted revision, `production`, the state row."""
    from persona_agent.adapters import tracking
    from persona_agent.adapters.registry import PersonaRegistry
    from persona_agent.nightly.jobs import commit

    tracking.setup(settings)
    registry, states = PersonaRegistry(LAMP_2M, settings.tracking_uri), StateStore.of(settings, LAMP_2M.key)
    outcomes = [_outcome(f"c{i:05d}") for i in range(n)]
    started = time.perf_counter()
    for outcome in outcomes:
        commit(outcome, LAMP_2M, registry, states=states, run_id=None, night=1)
    return n / (time.perf_counter() - started)


def _parallel_commit_rates(root: Path, counts=(1, 2, 4), n: int = 48) -> tuple[dict[str, float], str]:
    """Users per second through the nightly's commit processes (`Committer`), 1, 2 and 4 of them,
    against `mlflow server` on PostgreSQL (bench/pg_server.py starts both); ({}, why) where it cannot run."""
    sys.path.insert(0, str(Path(__file__).parent))
    from pg_server import missing, mlflow_server, postgres

    from persona_agent.adapters import tracking
    from persona_agent.nightly.committer import Committer

    if why := missing():
        return {}, why
    rates = {}
    with postgres() as backend, mlflow_server(backend, root / "pg-artifacts") as url:
        os.environ["MLFLOW_TRACKING_URI"] = url
        try:
            for k in counts:
                settings = Settings(store=root / f"pg-{k}")
                experiment = tracking.setup(settings)
                run = mlflow.MlflowClient().create_run(experiment).info.run_id
                users = [_outcome(f"k{k}-{i:04d}") for i in range(k + n)]
                with Committer(url, LAMP_2M.key, settings.state_db, run_id=run, night=1, min_free_mb=0,
                               processes=k) as committer:
                    warm = [committer.submit(o) for o in users[:k]]  # the processes start, import MLflow
                    assert not any(isinstance(committer.result(sent), BaseException) for sent in warm)
                    started = time.perf_counter()
                    timed = [committer.submit(o) for o in users[k:]]
                    results = [committer.result(sent) for sent in timed]
                    rates[str(k)] = round(n / (time.perf_counter() - started), 2)
                failed = [r for r in results if isinstance(r, BaseException)]
                assert not failed, failed[:1]
        finally:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
    return rates, "mlflow server on PostgreSQL"


def _outcome(user: str):
    from persona_agent.nightly.jobs import UserOutcome
    from persona_agent.optimizers import AlignmentStep, Outcome

    before, after = "Tags this user gives most, strongest first: comedy.", "Tags this user gives most: action, comedy."
    return UserOutcome(user, f"fp-{user}", "aligned", start_profile=before, item_ids=["1", "2"],
                       steps=[AlignmentStep(0, 0.5, before, after, outcome=Outcome.ACCEPTED, candidate_score=1.0)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--users", type=int, default=1000)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--json", action="store_true", help="print one JSON object last")
    ap.add_argument("--skip-postgres", action="store_true",
                    help="no commit throughput against PostgreSQL (it starts a cluster and an mlflow server)")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="night-scale-") as tmp:
        root = Path(tmp)
        settings = Settings(store=root / "store", lm=LMConfig("scripted", cache=False), batch_size=2, iterations=1,
                            max_iters=1, workers=a.workers, score_max=0)
        settings.store.mkdir(parents=True)
        data = write_dataset(root / "data", LAMP_2M, n_users=a.users, n_history=4, n_queries=1, seed=0)
        _ingest(settings, data)

        first, first_s = _night(settings)
        aligned = len(first.aligned) + len(first.rejected)
        none, none_s = _night(settings)
        assert none.lm_calls == 0, "a night with nothing new made LM calls"
        some = sorted(first.aligned + first.rejected)[:: 100][: max(1, a.users // 100)]
        query = LAMP_2M.make_input("A film about a heist.", LAMP_2M.labels)
        _ingest(settings, {u: [MemoryItem(f"new-{u}", query, "action", "2030-01-01")] for u in some})
        one, one_s = _night(settings)
        commits = _commit_rate(settings)
        parallel, backend = ({}, "skipped") if a.skip_postgres else _parallel_commit_rates(root)

    result = {
        "users": a.users,
        "first_night_users_per_s": round(aligned / first_s, 2),
        "driver_ms_per_user": round(1000 * first.driver_seconds / max(aligned, 1), 2),
        "driver_cpu_ms_per_user": round(1000 * first.driver_cpu_seconds / max(aligned, 1), 2),
        "no_change_night_s": round(none_s, 2),
        "one_percent_night_s": round(one_s, 2),
        "one_percent_users": len(one.aligned) + len(one.rejected),
        "commit_users_per_s": parallel,
        "commit_backend": backend,
        "sqlite_commit_users_per_s": round(commits, 2),
        "first_night_s": round(first_s, 2),
        "workers": a.workers,
    }
    print(f"{a.users} users, {a.workers} workers, scripted LLM")
    print(f"  first night:           {first_s:8.1f} s  ({result['first_night_users_per_s']} users/s)")
    print(f"  driver per user:       {result['driver_ms_per_user']:8.2f} ms (planning and tallying; of it, "
          f"{result['driver_cpu_ms_per_user']:.2f} ms its own CPU, the rest waits: I/O, the GIL held by workers)")
    print(f"  nothing new:           {none_s:8.1f} s")
    print(f"  1% with one new item:  {one_s:8.1f} s  ({result['one_percent_users']} users aligned)")
    print(f"  commits, SQLite:       {commits:8.1f} users/s (one process; a new user: initial persona, one "
          "revision, production, state)")
    print(f"  commits, {backend}: " + (", ".join(f"{k} committers {v} users/s" for k, v in parallel.items())
                                       or "not measured"))
    if a.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
