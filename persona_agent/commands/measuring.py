"""`demo`, `eval`, `sweep` and `compare`: the commands that measure, with their options and output."""

from __future__ import annotations

from pathlib import Path

from persona_agent.commands import Command
from persona_agent.commands.options import (
    alignment_options,
    count,
    data_source,
    evaluation_options,
    lm_options,
    set_option,
    store_options,
    task_option,
    trace_if_asked,
    users_of,
)
from persona_agent.settings import Settings


def demo_options(p, s):
    task_option(p)
    p.add_argument("--users", type=count(1), default=3, help="how many users (default 3)")
    p.add_argument("--queries", type=count(1), default=3, help="held-out queries per user (default 3)")
    p.add_argument("--data", type=Path, help="LaMP/OPPU data instead of the shipped synthetic set")
    set_option(p, "readable-drift")
    alignment_options(p, s)
    lm_options(p, s)


def demo_command(settings: Settings, args) -> int:
    from persona_agent.demo import run_demo
    from persona_agent.runtime.store import Store

    with Store.open(settings, memory="persistent", writes=True) as store:
        trace_if_asked(args)
        run_demo(settings, store, args.task, users=args.users, queries=args.queries, data=args.data, which=args.set)
    return 0


DEMO = Command(demo_command, demo_options, "align a few users of a shipped task end to end and print the scores", "Build memory, profile and persona for a few users, align them, and score before/after " "alignment against a non-personalized baseline.", Settings.for_demo)


def eval_options(p, s):
    p.add_argument("--wide", action="store_true",
                   help="print every column of the results table (default: the ones that fit a terminal; "
                        "results.csv has them all)")
    evaluation_options(p, s, "all", out="<store>/eval/<task>-<time>")


def eval_command(settings: Settings, args) -> int:
    from persona_agent.data.tasks import get_task
    from persona_agent.eval.harness import default_out, evaluate
    from persona_agent.eval.methods import resolve
    from persona_agent.runtime.store import Store

    task = get_task(args.task)
    methods, users = resolve(args.methods), users_of(args, task)
    with Store.open(settings, memory="run") as store:  # a measurement reads nothing another command stored
        trace_if_asked(args)
        source = data_source(args, task)[1]
        memory = store.scoped(f"{source}|{task.key}|{args.split or ''}")
        evaluate(settings, task, users, methods=methods, out=args.out or default_out(settings, task), memory=memory, keep_going=args.keep_going,
                 source=source, wide=args.wide)
    return 0


EVAL = Command(eval_command, eval_options, "score every method (the paper's table) on LaMP-format data", "Run the chosen methods on each user's queries and write the results table (CSV, markdown), " "per-method predictions in LaMP's golds format, and MLflow runs.")


def sweep_options(p, s):
    p.add_argument("param", choices=["batch", "iterations", "top_k", "history"],
                   help="alignment batch n, iterations T, retrieved memories K, or history items per user")
    p.add_argument("values", help="comma-separated integers, e.g. 1,2,3 (history: 10 for the paper's cold start)")
    evaluation_options(p, s, methods="persona-agent,non-personalized", out="<store>/sweeps")


def sweep_command(settings: Settings, args) -> int:
    from persona_agent.data.tasks import get_task
    from persona_agent.eval.methods import resolve
    from persona_agent.eval.sweep import sweep
    from persona_agent.runtime.store import Store

    try:
        values = [int(v) for v in args.values.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"sweep values must be comma-separated integers, not {args.values!r}") from None
    task = get_task(args.task)
    methods, users = resolve(args.methods), users_of(args, task)
    with Store.open(settings, memory="run") as store:
        table = sweep(settings, store, task, users=users, methods=methods, param=args.param, values=values, out=args.out or settings.sweeps_path)
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    return 0


SWEEP = Command(sweep_command, sweep_options, "test-time scaling: vary n, T, K or the history kept (cold start)", "Evaluate methods at each value of one setting; writes sweep_<param>.csv and a PNG plot, " "also as MLflow artifacts.")


def compare_options(p, s):
    p.add_argument("run_a", help="MLflow run id of the first run (A)")
    p.add_argument("run_b", help="MLflow run id of the second run (B): deltas are B - A")
    p.add_argument("--per-user", action="store_true", help="also list every per-user (child run) metric")
    store_options(p, s)


def compare_command(settings: Settings, args) -> int:
    from persona_agent.eval.compare import compare_runs, differing_params
    from persona_agent.runtime.store import Store

    with Store.open(settings, memory=None):
        table, params = compare_runs(args.run_a, args.run_b), differing_params(args.run_a, args.run_b)
    print("parameters that differ (a -> b):\n" + params.to_string(index=False) if len(params)
          else "the runs have the same parameters")
    if table.empty:
        print("no metrics in common")
        return 0
    overall, per_user = table[table.scope == "overall"], table[table.scope != "overall"]
    print(overall.drop(columns="scope").to_string(index=False, float_format="%.3f"))
    if args.per_user:
        print(per_user.to_string(index=False, float_format="%.3f"))
    elif len(per_user):
        moved = per_user[per_user.delta != 0]
        print(f"per user: {len(moved)} of {len(per_user)} metrics moved, in {moved.scope.nunique()} of "
              f"{per_user.scope.nunique()} runs in common (--per-user lists them)")
    return 0


COMPARE = Command(compare_command, compare_options, "metric deltas between two runs, per user and overall", "B - A for every metric both runs (and their per-user runs) logged.")
