"""`ingest` and `make-data`: the commands that bring data in, with their options and output."""

from __future__ import annotations

from pathlib import Path

from persona_agent.commands import Command
from persona_agent.commands.options import count, on_bad, skip_bad, store_options, task_option
from persona_agent.settings import Settings


def ingest_options(p, s):
    p.add_argument("path", type=Path, help="events .jsonl, a LaMP directory, or a LaMP/OPPU JSON file")
    task_option(p)
    p.add_argument("--split", help="LaMP split name when the directory holds several (dev, test, ...)")
    skip_bad(p)
    store_options(p, s)


def ingest_command(settings: Settings, args) -> int:
    from persona_agent.adapters.state import StateStore
    from persona_agent.data.tasks import get_task
    from persona_agent.pipelines.ingest import read_source, remember_new
    from persona_agent.runtime.store import Store

    bad = on_bad(args)
    source = read_source(args.path, get_task(args.task), args.split, on_bad=bad)  # all validated before the store opens
    with Store.open(settings, memory="persistent", tracking=False, writes=True) as store:
        report = remember_new(store.memory, source, StateStore.of(settings, args.task).mark_changed)
    print(f"read {report.read} interactions of {report.users} users: {report.added} new, {report.updated} updated, "
          f"{report.already_known} already in memory" + (f", {len(bad)} bad records skipped" if bad else ""))
    if bad:
        bad.report()
    return 0


INGEST = Command(ingest_command, ingest_options, "add new interactions to episodic memory (idempotent)", "Append a JSONL event log ({user_id, input, response, timestamp, id?} per line) or LaMP/OPPU " "files to memory. Re-ingesting the same file adds nothing.")


def make_data_options(p, s):
    from persona_agent.data.synthetic import LEVELS, RECENT

    p.add_argument("out", type=Path, help="output directory")
    task_option(p)
    p.add_argument("--users", type=count(1), default=20, help="users to generate (default 20)")
    p.add_argument("--history", type=count(1), default=40, help="history items per user (default 40)")
    p.add_argument("--queries", type=count(1), default=6, help="queries per user (default 6)")
    p.add_argument("--split", default="dev", help="split name: the files are {split}_questions.json, ... (default dev)")
    p.add_argument("--seed", type=int, default=0, help="random seed: the same seed writes the same data (default 0)")
    p.add_argument("--level", choices=LEVELS, default=LEVELS[0],
                   help="paraphrased: items imply what they support in words of their own (default); readable: "
                        "items say it in plain words, so what is left to the user is the choice among them")
    p.add_argument("--drift", action="store_true",
                   help=f"users whose preferences move: their latest {RECENT} interactions and every query follow a "
                        "new rule, older history the old one; the queries are built so the two answer differently")


def make_data_command(settings: Settings, args) -> int:
    from persona_agent.data.synthetic import MAX_LOOKUP, MAX_STALE, make_dataset
    from persona_agent.data.tasks import get_task

    task = get_task(args.task)
    out, check = make_dataset(args.out, task, split=args.split, n_users=args.users, n_history=args.history,
                              n_queries=args.queries, seed=args.seed, level=args.level, drift=args.drift)
    kind = f"{args.level}{', drifting' if args.drift else ''}"
    print(f"wrote {args.users} users of {task.name} ({kind}) to {out}\n"
          f"accuracy of rules that need no LLM: lookup (copy the label of the most similar history item) "
          f"{check.lookup:.3f} (at most {MAX_LOOKUP}), planted rule (each user's rule, read off the text) "
          f"{check.planted:.3f}" + ("" if check.stale is None else
                                    f", stale rule (each user's rule before the change: what a profile of their "
                                    f"whole history says) {check.stale:.3f} (at most {MAX_STALE})"))
    return 0


MAKE_DATA = Command(make_data_command, make_data_options, "generate LaMP-format data with measurable personalization", "Write {split}_questions.json, {split}_outputs.json and rules.json (each user's latent " "preference rule).")
