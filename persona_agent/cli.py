"""The `persona-agent` command: a table of commands, each a small function of `Settings`.

Every option's default is read from `Settings` (or the command's preset of it), so the help
text, the library and the CLI never disagree. Heavy imports (DSPy, MLflow, Qdrant) happen inside
the command that needs them, so `--help` is instant.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import shlex
import signal
import sys
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Callable

from persona_agent.data.loaders import MAX_FIELD_CHARS, shown
from persona_agent.settings import Settings, offline_environment, sqlite_file

# -- options ----------------------------------------------------------------------------------


def _at_least(minimum, convert=int, what="a whole number", maximum=10**9):
    """An argparse type: a finite number in [minimum, maximum], rejected at parse time otherwise
    (nan, inf and absurd values are no setting)."""
    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if not math.isfinite(value) or not minimum <= value <= maximum:
            raise argparse.ArgumentTypeError(f"must be {what} from {minimum:g} to {maximum:g}, not {text}")
        return value
    return parse


def _count(minimum: int, maximum: int = 10**9):
    return _at_least(minimum, maximum=maximum)


def _finite(minimum: float):
    return _at_least(minimum, float, "a finite number", maximum=1e6)


# Seconds: above zero (a zero timeout is no timeout) and at most a week.
_seconds = _at_least(1e-3, float, "a number of seconds", maximum=7 * 24 * 3600)


def _store_options(p: argparse.ArgumentParser, s: Settings) -> None:
    g = p.add_argument_group("store")
    g.add_argument("--store", type=Path, default=s.store,
                   help=f"directory of the MLflow store and embedded Qdrant (default: {s.store})")
    g.add_argument("--qdrant-url", default=s.qdrant_url, help="use a Qdrant server instead of the embedded store")
    g.add_argument("--wait", dest="store_wait", type=_seconds, default=s.store_wait,
                   help="seconds to wait while another process uses the embedded memory, then exit 5 "
                        f"(default {s.store_wait:g})")
    g.add_argument("--min-free-mb", type=_count(0, maximum=10**9), default=s.min_free_mb,
                   help="commands that write the store (ingest, nightly, demo, forget) refuse to start, and a nightly "
                        f"commit to go on, with less free disk space than this (default {s.min_free_mb})")
    g.add_argument("--experiment", default=s.experiment, help=f"MLflow experiment name (default {s.experiment})")
    g.add_argument("-v", "--verbose", action="store_true",
                   help="log at INFO level, and show DSPy's, GEPA's and MLflow's own progress and messages")


def _lm_options(p: argparse.ArgumentParser, s: Settings) -> None:
    """The LLM's options, on the commands that call one (and then the store's)."""
    g = p.add_argument_group("LLM")
    g.add_argument("--lm", default=s.lm.model,
                   help="'local' (in-process Gemma 3 270M), 'local:/path/model.gguf', 'scripted' (a deterministic "
                        "stand-in for tests: no model, no network), or any LiteLLM model such as "
                        f"openai/gpt-4o-mini (key from the environment; default {s.lm.model})")
    g.add_argument("--api-base", default=s.lm.api_base,
                   help="endpoint for the LiteLLM model (vLLM, Ollama, llama.cpp server, ...)")
    g.add_argument("--max-tokens", type=_count(1), default=s.lm.max_tokens,
                   help="ceiling on the tokens one LM call may generate; under a JSON schema (local engine, "
                        "--api-base servers) each kind of call is bounded tighter by its fields: a label, an "
                        f"80-character step thought, 600-character free text (default {s.lm.max_tokens})")
    g.add_argument("--retries", type=_count(0), default=s.lm.retries,
                   help=f"retries per LM call on timeouts, 429 and 5xx, with backoff (default {s.lm.retries})")
    g.add_argument("--timeout", type=_seconds, default=s.lm.timeout,
                   help=f"seconds per remote LM request (default {s.lm.timeout:g})")
    g.add_argument("--no-cache", dest="cache", action="store_false", default=s.lm.cache,
                   help="ask the LLM every time instead of answering repeated requests from DSPy's cache (for timing)")
    _store_options(p, s)


def _agent_options(g, s: Settings) -> None:
    g.add_argument("--top-k", "-k", type=_count(0), default=s.top_k,
                   help=f"memories retrieved per query (default {s.top_k})")
    g.add_argument("--max-iters", type=_count(0), default=s.max_iters,
                   help=f"ReAct steps per answer (default {s.max_iters})")
    g.add_argument("--answer-step", choices=("evidence", "prompt"), default=s.answer_step,
                   help="evidence: the persona's preferences are a prior on the LM's label log-probabilities (an LM "
                        "that gives none answers by prompting, logged); prompt: the paper's agent, the persona as "
                        f"the instruction (default {s.answer_step})")
    g.add_argument("--prior-strength", type=_finite(0), default=s.prior_strength,
                   help="evidence: how much the persona weighs: for a rating tendency or topics, nats at most "
                        "added to a label; for a list of labels on a task that reads its items, any value above 0 "
                        "lets the user's order choose among the labels the item supports; on others, about how "
                        f"many labels an item supports (default {s.prior_strength:g}; 0: no persona)")
    g.add_argument("--support-margin", type=_finite(0), default=s.support_margin,
                   help="evidence, tasks whose items name what they support (LaMP-2): a label the item supports "
                        "scores within this many nats of the best when the LM reads the item; the persona picks "
                        f"among those (default {s.support_margin:g})")
    g.add_argument("--trace", action="store_true", help="record MLflow traces of every agent call")


def _alignment_options(p: argparse.ArgumentParser, s: Settings) -> None:
    g = p.add_argument_group("alignment")
    g.add_argument("--iterations", "-T", type=_count(0), default=s.iterations,
                   help=f"alignment iterations (default {s.iterations})")
    g.add_argument("--batch", "-n", dest="batch_size", type=_count(1), default=s.batch_size,
                   help=f"latest interactions per iteration (default {s.batch_size})")
    g.add_argument("--loss", choices=["per_interaction", "batch"], default=s.loss,
                   help=f"critique each interaction (the paper) or the whole batch in one LM call (default {s.loss})")
    g.add_argument("--acceptance", choices=("strict", "consistent", "agreement", "paper"), default=s.acceptance,
                   help="which rewrite ships, of those that pass the profile check: strict, one that scores better "
                        "on the batch (a tie keeps the current persona); consistent, as strict, and its preferences "
                        "agree no worse with the latest 2n interactions (no LM call); agreement, as strict, but a "
                        "tie ships when the rewrite's preferences agree better with the batch's real answers; paper, "
                        f"every one, unscored (default {s.acceptance})")
    g.add_argument("--no-guard", dest="guard", action="store_false", default=s.guard,
                   help="the paper's loop, as --acceptance paper")
    g.add_argument("--holdout", type=_count(0), default=s.holdout,
                   help=f"older interactions a rewrite must not score worse on either (default {s.holdout})")
    g.add_argument("--redraw-temperature", type=float, default=s.redraw_temperature,
                   help="after an iteration that shipped nothing, draw the next rewrite at this temperature "
                        f"instead of writing the same one again (default {s.redraw_temperature}; 0: greedy)")
    _agent_options(g, s)


def _workers_option(p: argparse.ArgumentParser, s: Settings, what: str) -> None:
    p.add_argument("--workers", type=_count(1, maximum=4096), default=s.workers, help=f"{what} (default {s.workers})")


def _task_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", default="lamp2m", help="lamp1, lamp2m, lamp2n or lamp3 (default lamp2m)")


def _set_option(p: argparse.ArgumentParser, default: str) -> None:
    from persona_agent.data.synthetic import SETS

    p.add_argument("--set", choices=SETS, default=default,
                   help="which shipped synthetic set, without --data: users whose rule stays or drifts, items "
                        f"paraphrased or readable (default {default})")


def _data_source(args, task) -> tuple[Path, str]:
    """The data directory and how runs name it: --data, or the shipped set --set names."""
    from persona_agent.data.synthetic import shipped_data_dir

    if args.data is not None:
        return args.data, str(args.data)
    return shipped_data_dir(task, args.set), "shipped" if args.set == "stable" else f"shipped:{args.set}"


def _skip_bad(p: argparse.ArgumentParser) -> None:
    p.add_argument("--skip-bad", action="store_true",
                   help="skip (and count) bad records instead of stopping at the first one")


def _evaluation_options(p: argparse.ArgumentParser, s: Settings, methods: str, out: str) -> None:
    """The data, method and output options `eval` and `sweep` share."""
    _task_option(p)
    p.add_argument("--data", type=Path, help="LaMP directory or OPPU file (default: the shipped synthetic set)")
    _set_option(p, "stable")
    p.add_argument("--split", help="LaMP split name when the directory holds several (dev, test, ...)")
    p.add_argument("--methods", default=methods, help=f"comma-separated method names, or 'all' (default {methods})")
    p.add_argument("--users", type=_count(1), help="first N users (default all)")
    p.add_argument("--queries", type=_count(1), help="first N queries per user (default all)")
    _workers_option(p, s, "users evaluated in parallel")
    p.add_argument("--out", type=Path, help=f"output directory (default {out})")
    p.add_argument("--keep-going", action="store_true",
                   help="when the LLM still fails after its retries, drop that user from every method and go on "
                        "(default: stop with exit code 4 and the table of the users that finished)")
    _skip_bad(p)
    _alignment_options(p, s)
    _lm_options(p, s)


def _settings(args: argparse.Namespace, base: Settings) -> Settings:
    """`base` with every Settings field the command's options set."""
    given = vars(args)
    lm = base.lm
    if "lm" in given:  # a command that calls the LLM: refuse a model no call could reach, before any work
        from persona_agent.adapters.llm import check_model

        lm = replace(base.lm, model=args.lm, api_base=args.api_base, retries=args.retries, timeout=args.timeout,
                     cache=args.cache, max_tokens=args.max_tokens)
        check_model(lm)
    knobs = {f.name: given[f.name] for f in fields(Settings) if f.name in given and f.name != "lm"}
    return replace(base, lm=lm, **knobs)


class _BadRecords(list):
    """Collects the records `--skip-bad` skipped; reports them on stderr."""

    def __call__(self, err) -> None:
        self.append(err)
        logging.getLogger("persona_agent").warning("skipped: %s", err)

    def report(self) -> None:
        if self:
            print(f"persona-agent: skipped {len(self)} bad record(s); first: {self[0]}", file=sys.stderr)


def _on_bad(args) -> _BadRecords | None:
    return _BadRecords() if getattr(args, "skip_bad", False) else None


def _trace_if_asked(args) -> None:
    """After the store is open (traces go to its experiment)."""
    if getattr(args, "trace", False):
        from persona_agent.adapters import tracking

        tracking.enable_traces()


def _users(args, task):
    from persona_agent.data.loaders import load_users

    bad = _on_bad(args)
    users = load_users(_data_source(args, task)[0], task, args.split, bad)[: args.users]
    if bad:
        bad.report()
    if args.queries is not None:
        users = [replace(u, queries=u.queries[: args.queries]) for u in users]
    return users


# -- commands ---------------------------------------------------------------------------------
# Each opens the store it needs with `Store.open(settings, memory=...)`: where memory lives is
# decided here, once per command.


def demo_command(settings: Settings, args) -> int:
    from persona_agent.demo import run_demo
    from persona_agent.runtime.store import Store

    with Store.open(settings, memory="persistent", writes=True) as store:
        _trace_if_asked(args)
        run_demo(settings, store, args.task, args.users, args.queries, args.data, which=args.set)
    return 0


def eval_command(settings: Settings, args) -> int:
    from persona_agent.data.tasks import get_task
    from persona_agent.eval.harness import default_out, evaluate
    from persona_agent.eval.methods import resolve
    from persona_agent.runtime.store import Store

    task = get_task(args.task)
    methods, users = resolve(args.methods), _users(args, task)
    with Store.open(settings, memory="run") as store:  # a measurement reads nothing another command stored
        _trace_if_asked(args)
        source = _data_source(args, task)[1]
        memory = store.scoped(f"{source}|{task.key}|{args.split or ''}")
        evaluate(settings, task, users, methods, args.out or default_out(settings, task), memory, keep_going=args.keep_going,
                 source=source, wide=args.wide)
    return 0


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
    methods, users = resolve(args.methods), _users(args, task)
    with Store.open(settings, memory="run") as store:
        table = sweep(settings, store, task, users, methods, args.param, values, args.out or settings.sweeps_path)
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    return 0


def ingest_command(settings: Settings, args) -> int:
    from persona_agent.adapters.state import StateStore
    from persona_agent.data.tasks import get_task
    from persona_agent.pipelines.ingest import read_source, remember_new
    from persona_agent.runtime.store import Store

    bad = _on_bad(args)
    source = read_source(args.path, get_task(args.task), args.split, bad)  # all validated before the store opens
    with Store.open(settings, memory="persistent", tracking=False, writes=True) as store:
        report = remember_new(store.memory, source, StateStore.of(settings, args.task).mark_changed)
    print(f"read {report.read} interactions of {report.users} users: {report.added} new, {report.updated} updated, "
          f"{report.already_known} already in memory" + (f", {len(bad)} bad records skipped" if bad else ""))
    if bad:
        bad.report()
    return 0


def nightly_command(settings: Settings, args) -> int:
    from persona_agent.data.tasks import get_task
    from persona_agent.nightly.driver import NightlyLocked, print_summary, run_nightly

    _trace_if_asked(args)
    try:  # opens the persistent store itself, under the nightly lock
        summary = run_nightly(settings, get_task(args.task), executor=args.executor)
    except NightlyLocked as err:
        print(f"persona-agent: {err}", file=sys.stderr)
        return 3
    print_summary(summary, task=get_task(args.task))
    if summary.stopped_by:  # the shell's convention: 128 + the signal's number
        return 128 + int(getattr(signal, summary.stopped_by))
    return 1 if summary.failed else 0


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


def personas_command(settings: Settings, args) -> int:
    from persona_agent.data.tasks import get_task
    from persona_agent.runtime.store import Store

    task = get_task(args.task)
    with Store.open(settings, memory=None) as store:
        registry = store.registry(task)
        if args.action == "list":
            table = registry.users()
            table["user_id"] = table["user_id"].map(shown)  # an id from before ingest refused them never prints raw
            print(table.to_string(index=False) if len(table) else "no personas registered yet")
        elif args.action == "show":
            print(registry.get(args.user, args.version).persona.render())
        elif args.action == "history":
            table = registry.history(args.user)
            if table.empty:
                raise LookupError(f"{task.key} user {args.user!r} has no persona in the registry")
            print(table.to_string(index=False) if args.wide else _fit(table.drop(columns=["iteration", "lm_calls",
                                                                                        "tokens", "message"])))
        elif args.action == "diff":
            print(registry.diff(args.user, args.v1, args.v2) or "identical")
        elif args.action == "rollback":
            registry.rollback(args.user, args.to, force=args.force)
            print(f"{args.user}: production is now version {args.to}")
    return 0


def doctor_command(settings: Settings, args) -> int:
    from persona_agent.operations.doctor import doctor, print_findings

    findings = doctor(settings)
    print_findings(findings)
    return 6 if any(f.status == "damaged" for f in findings) else 1 if any(f.status == "unfinished" for f in findings) else 0


def backup_command(settings: Settings, args) -> int:
    from persona_agent.operations.doctor import BackupRefused, backup, print_findings

    try:
        findings = backup(settings, args.dest)
    except BackupRefused as err:  # nothing at DEST, so no restore line for it
        print(f"persona-agent: {err}", file=sys.stderr)
        return 6
    print(f"backed up {settings.store} to {args.dest}; the copy, checked:")
    print_findings(findings)
    if sqlite_file(settings.tracking_uri) is None:
        print(f"the tracking server's database ({settings.tracking_uri}) is not in it: back it up with its own tools")
    print(f"restore: mv {shlex.quote(str(settings.store))} {shlex.quote(str(settings.store) + '.damaged')} && "
          f"cp -a --sparse=always {shlex.quote(str(args.dest))} {shlex.quote(str(settings.store))}")
    return 0


def forget_command(settings: Settings, args) -> int:
    from persona_agent.operations.forget import EraseUnfinished, forget
    from persona_agent.runtime.store import Store

    try:
        # memory is opened by `forget` itself, under the store's locks; it rewrites the shard: a write
        with Store.open(settings, memory=None, writes=True):
            removed = forget(settings, args.user)
    except EraseUnfinished as err:  # never "nothing was changed": it says what was
        print(f"persona-agent: {err}", file=sys.stderr)
        return 7 if err.disk_full else 2
    if not removed:
        print(f"nothing of {shown(args.user)} is stored in {settings.store}: no user has that id; nothing was changed")
        return 0
    print(f"forgot {shown(args.user)}: " + ", ".join(f"{n} {kind}" for kind, n in removed.items())
          + f"; recorded (without their id) in {settings.store / 'forgotten.jsonl'}")
    return 0


def _fit(table, last: str = "reason") -> str:
    """`table` as text in the terminal's width (80 when not a terminal): the `last` column, free
    text, is cut with an ellipsis where the line would run over."""
    import shutil

    width = shutil.get_terminal_size((80, 24)).columns
    head = table.drop(columns=[last]).to_string(index=False).splitlines()
    room = max(10, width - max(len(line) for line in head) - 2)
    cut = [text if len(text) <= room else text[:room - 1] + "…" for text in table[last].fillna("").astype(str)]
    return "\n".join(f"{h}  {c}" for h, c in zip(head, [last, *cut]))


def answer_command(settings: Settings, args) -> int:
    from persona_agent.data.tasks import get_task
    from persona_agent.runtime.store import Store
    from persona_agent.serving.answer import answer

    try:  # the shell hands undecodable bytes over as surrogates: refused here, not deep in the LM client
        args.query.encode("utf-8")
    except UnicodeEncodeError as err:
        char = ord(err.object[err.start])
        what = f"byte 0x{char - 0xDC00:02x}" if 0xDC80 <= char <= 0xDCFF else f"character U+{char:04X}"
        raise ValueError(f"the query is not UTF-8 text ({what} at position {err.start})") from None
    if not args.query.strip():
        raise ValueError("the query is empty")
    if len(args.query) > MAX_FIELD_CHARS:  # the limit every stored text has (ingest refuses a longer one)
        raise ValueError(f"the query is {len(args.query):,} characters (limit {MAX_FIELD_CHARS:,})")
    with Store.open(settings, memory="persistent") as store:
        _trace_if_asked(args)
        print(answer(store, get_task(args.task), args.user, args.query))
    return 0


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


def log_model_command(settings: Settings, args) -> int:
    from persona_agent.data.tasks import get_task
    from persona_agent.runtime.store import Store
    from persona_agent.serving.model import log_model, serve_instructions

    task = get_task(args.task)
    with Store.open(settings, memory=None) as store:
        uri = log_model(settings, task.key, args.register)
        served = store.registry(task).first_served()  # the printed request asks for a user it serves
    print(f"logged {uri}\n" + serve_instructions(settings, uri, task, served))
    return 0


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


# -- the table --------------------------------------------------------------------------------


def _demo_args(p, s):
    _task_option(p)
    p.add_argument("--users", type=_count(1), default=3, help="how many users (default 3)")
    p.add_argument("--queries", type=_count(1), default=3, help="held-out queries per user (default 3)")
    p.add_argument("--data", type=Path, help="LaMP/OPPU data instead of the shipped synthetic set")
    _set_option(p, "readable-drift")
    _alignment_options(p, s)
    _lm_options(p, s)


def _eval_args(p, s):
    p.add_argument("--wide", action="store_true",
                   help="print every column of the results table (default: the ones that fit a terminal; "
                        "results.csv has them all)")
    _evaluation_options(p, s, "all", "<store>/eval/<task>-<time>")


def _sweep_args(p, s):
    p.add_argument("param", choices=["batch", "iterations", "top_k", "history"],
                   help="alignment batch n, iterations T, retrieved memories K, or history items per user")
    p.add_argument("values", help="comma-separated integers, e.g. 1,2,3 (history: 10 for the paper's cold start)")
    _evaluation_options(p, s, methods="persona-agent,non-personalized", out="<store>/sweeps")


def _ingest_args(p, s):
    p.add_argument("path", type=Path, help="events .jsonl, a LaMP directory, or a LaMP/OPPU JSON file")
    _task_option(p)
    p.add_argument("--split", help="LaMP split name when the directory holds several (dev, test, ...)")
    _skip_bad(p)
    _store_options(p, s)


def _nightly_args(p, s):
    _task_option(p)
    _workers_option(p, s, "users aligned concurrently")
    p.add_argument("--executor", choices=["thread", "ray"], default="thread",
                   help="threads in this process, or a Ray cluster (RAY_ADDRESS, else a local one)")
    p.add_argument("--score-max", type=_count(0), default=s.score_max,
                   help="newest unseen interactions per user to score the production persona on before "
                        f"aligning (0: none; default {s.score_max})")
    p.add_argument("--rollback-on-regression", dest="rollback_after", metavar="K", type=_count(0),
                   default=s.rollback_after,
                   help="when a user's production persona scores below its mean over the last K scored nights, "
                        "move production back to the last version that scored better (0: never; default 0)")
    p.add_argument("--max-calls-per-user", type=_count(0), default=s.max_calls_per_user,
                   help="LM calls one user may use per night; a user who needs more is deferred, never half "
                        "aligned (0: no limit)")
    p.add_argument("--max-calls", type=_count(0), default=s.max_calls,
                   help="LM calls per night in all; users past it are deferred to the next night (0: no limit)")
    p.add_argument("--committers", type=_count(1, maximum=64), default=s.committers,
                   help="processes committing users in parallel against a tracking server (MLFLOW_TRACKING_URI="
                        f"http://...); a local SQLite store takes one (default {s.committers})")
    p.add_argument("--all-users", dest="plan_all", action="store_true",
                   help="read every user's memory to plan (default: only the users `ingest` marked changed, and "
                        "those a failed, deferred or interrupted run left; for memory written by other means)")
    _alignment_options(p, s)
    _lm_options(p, s)


def _make_data_args(p, s):
    from persona_agent.data.synthetic import LEVELS, RECENT

    p.add_argument("out", type=Path, help="output directory")
    _task_option(p)
    p.add_argument("--users", type=_count(1), default=20, help="users to generate (default 20)")
    p.add_argument("--history", type=_count(1), default=40, help="history items per user (default 40)")
    p.add_argument("--queries", type=_count(1), default=6, help="queries per user (default 6)")
    p.add_argument("--split", default="dev", help="split name: the files are {split}_questions.json, ... (default dev)")
    p.add_argument("--seed", type=int, default=0, help="random seed: the same seed writes the same data (default 0)")
    p.add_argument("--level", choices=LEVELS, default=LEVELS[0],
                   help="paraphrased: items imply what they support in words of their own (default); readable: "
                        "items say it in plain words, so what is left to the user is the choice among them")
    p.add_argument("--drift", action="store_true",
                   help=f"users whose preferences move: their latest {RECENT} interactions and every query follow a "
                        "new rule, older history the old one; the queries are built so the two answer differently")


def _personas_args(p, s):
    actions = p.add_subparsers(dest="action", required=True)
    for name, help_ in (("list", "users with personas: versions and the production version"),
                        ("show", "a persona's text (production, or --version V)"),
                        ("history", "every version of a user's persona with scores, acceptance and cost"),
                        ("diff", "unified diff between two versions"),
                        ("rollback", "make an earlier version the production one")):
        a = actions.add_parser(name, help=help_, description=help_)
        if name != "list":
            a.add_argument("user", help="user id")
        if name == "show":
            a.add_argument("--version", type=_count(1), help="version number (default: production)")
        if name == "diff":
            a.add_argument("v1", type=_count(1))
            a.add_argument("v2", type=_count(1))
        if name == "rollback":
            a.add_argument("--to", type=_count(1), required=True, help="version to serve")
            a.add_argument("--force", action="store_true",
                           help="serve it even if its profile fails today's profile check (tagged `forced`, logged)")
        if name == "history":
            a.add_argument("--wide", action="store_true",
                           help="every column, the whole reason and message (default: what fits the terminal)")
        a.add_argument("--task", default="lamp2m", help="task of the personas (default lamp2m)")
        _store_options(a, s)


def _answer_args(p, s):
    p.add_argument("user", help="user id")
    p.add_argument("query", help="the request, in the task's input format")
    _task_option(p)
    _agent_options(p.add_argument_group("agent"), s)
    _lm_options(p, s)


def _report_args(p, s):
    _task_option(p)
    p.add_argument("--last", type=_count(1), default=3, help="nights a user's latest score is compared with (default 3)")
    p.add_argument("--out", type=Path, help="output directory (default <store>/reports)")
    _store_options(p, s)


def _doctor_args(p, s):
    _store_options(p, s)


def _backup_args(p, s):
    p.add_argument("dest", type=Path, help="a new directory for the copy (must not exist)")
    _store_options(p, s)


def _forget_args(p, s):
    p.add_argument("user", help="the user id, as in their events")
    _store_options(p, s)


def _log_model_args(p, s):
    _task_option(p)
    p.add_argument("--register", metavar="NAME", help="also register it in MLflow's model registry under NAME")
    _agent_options(p.add_argument_group("agent"), s)
    _lm_options(p, s)


def _compare_args(p, s):
    p.add_argument("run_a", help="MLflow run id of the first run (A)")
    p.add_argument("run_b", help="MLflow run id of the second run (B): deltas are B - A")
    p.add_argument("--per-user", action="store_true", help="also list every per-user (child run) metric")
    _store_options(p, s)


@dataclass(frozen=True)
class Command:
    run: Callable[[Settings, argparse.Namespace], int]
    arguments: Callable[[argparse.ArgumentParser, Settings], None]
    help: str
    description: str = ""
    defaults: Callable[[], Settings] = Settings  # the Settings this command's options start from


COMMANDS: dict[str, Command] = {
    "demo": Command(demo_command, _demo_args, "align a few users of a shipped task end to end and print the scores",
                    "Build memory, profile and persona for a few users, align them, and score before/after "
                    "alignment against a non-personalized baseline.", Settings.for_demo),
    "eval": Command(eval_command, _eval_args,
                    "score every method (the paper's table) on LaMP-format data",
                    "Run the chosen methods on each user's queries and write the results table (CSV, markdown), "
                    "per-method predictions in LaMP's golds format, and MLflow runs."),
    "sweep": Command(sweep_command, _sweep_args, "test-time scaling: vary n, T, K or the history kept (cold start)",
                     "Evaluate methods at each value of one setting; writes sweep_<param>.csv and a PNG plot, "
                     "also as MLflow artifacts."),
    "ingest": Command(ingest_command, _ingest_args, "add new interactions to episodic memory (idempotent)",
                      "Append a JSONL event log ({user_id, input, response, timestamp, id?} per line) or LaMP/OPPU "
                      "files to memory. Re-ingesting the same file adds nothing."),
    "nightly": Command(nightly_command, _nightly_args, "re-align users whose history changed; resumable, one run per store",
                       "Refresh semantic memory and re-align exactly the users with new interactions. A killed run "
                       "is finished by the next one; a second concurrent run refuses to start."),
    "make-data": Command(make_data_command, _make_data_args, "generate LaMP-format data with measurable personalization",
                         "Write {split}_questions.json, {split}_outputs.json and rules.json (each user's latent "
                         "preference rule)."),
    "personas": Command(personas_command, _personas_args,
                        "inspect, compare and roll back personas in the MLflow prompt registry"),
    "answer": Command(answer_command, _answer_args, "answer a query as USER's agent, with their production persona",
                      "Serve one query: the production persona, the user's memory, the agent."),
    "report": Command(report_command, _report_args, "the nightly trend: production personas on each night's new interactions",
                      "Collect every night's prequential scores into a CSV and a PNG (overall and per user), log "
                      "them to MLflow, and name the users whose score fell."),
    "log-model": Command(log_model_command, _log_model_args, "log every user's persona agent as one MLflow model (pyfunc)",
                         "A model that answers user_id + query with that user's production persona, read at "
                         "predict time: serve it with `mlflow models serve`."),
    "doctor": Command(doctor_command, _doctor_args, "check a store: memory, each user's history, MLflow's database, leftovers",
                      "Read every part of the store back, change nothing, and say what to do about what is wrong "
                      "(exit 6 when something is damaged)."),
    "backup": Command(backup_command, _backup_args, "copy the store consistently (memory, MLflow database, state)",
                      "Copy the store to DEST while no nightly and no memory writer runs, then check the copy."),
    "forget": Command(forget_command, _forget_args, "erase a user: memories, personas, state, their rows in runs, "
                      "traces, cached LM answers", "Remove every byte the store, the tracking store and the LM cache "
                      "hold of USER, and record the erasure without their id. Idempotent."),
    "compare": Command(compare_command, _compare_args, "metric deltas between two runs, per user and overall",
                       "B - A for every metric both runs (and their per-user runs) logged."),
}


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("persona-agent")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="persona-agent",
                                     description="Per-user personas for DSPy agents, aligned at test time.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, command in COMMANDS.items():
        p = sub.add_parser(name, help=command.help, description=command.description or command.help)
        command.arguments(p, command.defaults())
    return parser


def _quiet_libraries() -> None:
    """DSPy's evaluation bars, GEPA's and MLflow's INFO lines would bury the command's own output
    (and land in `command > file`): shown with --verbose only (tqdm's bars: `TQDM_DISABLE`, set
    before it is imported). The loggers set their own level when imported, so this runs after.
    GEPA's warnings are about its internals (no reflective examples for a predictor), not ours."""
    for name in ("dspy", "mlflow", "LiteLLM", "httpx", "gepa"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # logs every database error with its traceback before raising it, which we then report in one line
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)
    logging.getLogger("dspy.teleprompt.gepa").setLevel(logging.ERROR)


def _tracking_error(err, settings: Settings) -> str:
    """MLflow's database errors carry the SQL and its parameters over several lines: one line
    instead, saying what the user can act on."""
    text = str(err)
    if "readonly database" in text or "Read-only file system" in text:
        return f"{settings.tracking_uri}: the tracking database is read-only; nothing was changed"
    if "database disk image is malformed" in text or "file is not a database" in text:
        return (f"{settings.tracking_uri}: the tracking database is damaged; `persona-agent doctor --store "
                f"{shlex.quote(str(settings.store))}` checks it, and a store is restored from a `persona-agent backup`")
    if "database or disk is full" in text:
        return f"{settings.tracking_uri}: the disk is full; nothing was changed: free some space and run it again"
    return text.split("\n[SQL:")[0].strip()


def main(argv: list[str] | None = None) -> int:
    from persona_agent.runtime.progress import command_clock

    with command_clock():
        return _main(argv)


def _main(argv: list[str] | None) -> int:
    offline_environment()
    from persona_agent.overrides import tolerate_tqdm_thread_races

    tolerate_tqdm_thread_races()
    args = build_parser().parse_args(argv)
    verbose = getattr(args, "verbose", False)
    if not verbose:  # read by tqdm when it is imported
        os.environ.setdefault("TQDM_DISABLE", "1")
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not verbose:
        _quiet_libraries()
    command = COMMANDS[args.command]
    settings = command.defaults()
    try:
        settings = _settings(args, settings) if hasattr(args, "store") else settings
        code = command.run(settings, args)
        if getattr(args, "trace", False):
            from persona_agent.adapters import tracking

            tracking.flush_traces()
        return code
    except KeyboardInterrupt:  # Ctrl-C (nightly: the second one): one line, the shell's code, no waiting
        print("persona-agent: aborted; nothing half done was committed (nightly: the next run does the rest)",
              file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130)  # not sys.exit: the interpreter would wait for worker threads still in an LM call
    except Exception as err:
        exit_code, line = exit_for(err, settings)
        if exit_code is None:
            raise
        print(f"persona-agent: {line}", file=sys.stderr)
        return exit_code


def exit_codes() -> list[tuple[tuple[type, ...], int | Callable, Callable]]:
    """What an error means to a scheduler: (exception types, the exit code or error -> it,
    (settings, error) -> the one line said), the first match wins. docs/operations.md's table of
    codes is checked against it (tests/test_cli.py). The libraries are imported here, not at the
    top: `--help` loads none."""
    from dspy.utils.exceptions import AdapterParseError, LMError, is_retryable_lm_error
    from mlflow.exceptions import MlflowException
    from sqlalchemy.exc import SQLAlchemyError

    from persona_agent.data.tasks import TaskDataError
    from persona_agent.eval.harness import EvalStopped
    from persona_agent.pipelines.points import StoreDamaged
    from persona_agent.runtime.store import StoreBusy, StoreFull, disk_full

    def os_error(settings, err):  # a missing file, a directory for a file, a read-only store, a full disk ...
        return f"{err.filename}: " * bool(err.filename) + str(err.strerror or err)

    def lm_failed(settings, err):  # a wrong --lm/--api-base/key or quota (not retried), or an outage after retries
        after = f" after {settings.lm.retries} retries" if is_retryable_lm_error(err) else ""
        return f"the LLM failed{after}: {' '.join(str(err).split())[:500]}"

    plain = lambda settings, err: str(err)  # noqa: E731
    return [
        ((StoreBusy,), 5, plain),
        ((StoreFull,), 7, plain),
        ((StoreDamaged,), 6, lambda settings, err: f"{err}; `persona-agent doctor --store {shlex.quote(str(settings.store))}` "
                                                   "checks the whole store, and a store is restored from a "
                                                   "`persona-agent backup`"),
        ((MlflowException, SQLAlchemyError), 2, lambda settings, err: _tracking_error(err, settings)),
        ((TaskDataError, LookupError, ValueError), 2, plain),
        ((EvalStopped,), 4, plain),
        ((AdapterParseError,), 4,  # an answer that arrived but is no answer (answer, demo)
         lambda settings, err: f"the LLM's answer could not be used: {' '.join(str(err).split())[:300]}"),
        ((OSError,), lambda err: 7 if disk_full(err) else 2, os_error),  # 7: the disk is full
        ((LMError,), 4, lm_failed),
    ]


def exit_for(err: Exception, settings: Settings) -> tuple[int | None, str]:
    """The exit code and the one line for `err`, or (None, "") for an error no row names (a bug:
    it is raised, with its traceback)."""
    for types, code, line in exit_codes():
        if isinstance(err, types):
            return (code(err) if callable(code) else code), line(settings, err)
    return None, ""


if __name__ == "__main__":
    sys.exit(main())
