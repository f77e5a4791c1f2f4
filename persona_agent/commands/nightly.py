"""`nightly` and `report`: the nightly re-alignment and its trend, with their options and output."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

from persona_agent.commands import Command
from persona_agent.commands.options import (
    alignment_options,
    count,
    lm_options,
    store_options,
    task_option,
    trace_if_asked,
    workers_option,
)
from persona_agent.settings import Settings


def nightly_options(p, s):
    task_option(p)
    workers_option(p, s, "users aligned concurrently")
    p.add_argument("--executor", choices=["thread", "ray"], default="thread",
                   help="threads in this process, or a Ray cluster (RAY_ADDRESS, else a local one)")
    p.add_argument("--score-max", type=count(0), default=s.score_max,
                   help="newest unseen interactions per user to score the production persona on before "
                        f"aligning (0: none; default {s.score_max})")
    p.add_argument("--rollback-on-regression", dest="rollback_after", metavar="K", type=count(0),
                   default=s.rollback_after,
                   help="when a user's production persona scores below its mean over the last K scored nights, "
                        "move production back to the last version that scored better (0: never; default 0)")
    p.add_argument("--max-calls-per-user", type=count(0), default=s.max_calls_per_user,
                   help="LM calls one user may use per night; a user who needs more is deferred, never half "
                        "aligned (0: no limit)")
    p.add_argument("--max-calls", type=count(0), default=s.max_calls,
                   help="LM calls per night in all; users past it are deferred to the next night (0: no limit)")
    p.add_argument("--committers", type=count(1, maximum=64), default=s.committers,
                   help="processes committing users in parallel against a tracking server (MLFLOW_TRACKING_URI="
                        f"http://...); a local SQLite store takes one (default {s.committers})")
    p.add_argument("--all-users", dest="plan_all", action="store_true",
                   help="read every user's memory to plan (default: only the users `ingest` marked changed, and "
                        "those a failed, deferred or interrupted run left; for memory written by other means)")
    alignment_options(p, s)
    lm_options(p, s)


def nightly_command(settings: Settings, args) -> int:
    from persona_agent.data.tasks import get_task
    from persona_agent.nightly.driver import NightlyLocked, print_summary, run_nightly

    trace_if_asked(args)
    try:  # opens the persistent store itself, under the nightly lock
        summary = run_nightly(settings, get_task(args.task), executor=args.executor)
    except NightlyLocked as err:
        print(f"persona-agent: {err}", file=sys.stderr)
        return 3
    print_summary(summary, task=get_task(args.task))
    if summary.stopped_by:  # the shell's convention: 128 + the signal's number
        return 128 + int(getattr(signal, summary.stopped_by))
    return 1 if summary.failed else 0


NIGHTLY = Command(nightly_command, nightly_options, "re-align users whose history changed; resumable, one run per store", "Refresh semantic memory and re-align exactly the users with new interactions. A killed run " "is finished by the next one; a second concurrent run refuses to start.")


def report_options(p, s):
    task_option(p)
    p.add_argument("--last", type=count(1), default=3, help="nights a user's latest score is compared with (default 3)")
    p.add_argument("--out", type=Path, help="output directory (default <store>/reports)")
    store_options(p, s)


def report_command(settings: Settings, args) -> int:
    from persona_agent.data.tasks import get_task
    from persona_agent.nightly.report import write_report
    from persona_agent.runtime.progress import output
    from persona_agent.runtime.store import Store

    with Store.open(settings, memory=None):
        result = write_report(get_task(args.task), args.out or settings.reports_path, args.last)
    console = output()
    console.print(result.table[result.table.user_id == "all"].drop(columns="user_id").to_string(index=False,
                  float_format=lambda x: f"{x:.3f}"))
    if result.fell.empty:
        console.print(f"no user's score fell against their previous {args.last} nights")
    else:
        console.print(f"{len(result.fell)} users' score fell against their previous {args.last} nights:")
        console.print(result.fell.to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    console.print(f"wrote {result.csv} and {result.png} (also in MLflow)")
    return 0


REPORT = Command(report_command, report_options, "the nightly trend: production personas on each night's new interactions", "Collect every night's prequential scores into a CSV and a PNG (overall and per user), log " "them to MLflow, and name the users whose score fell.")
