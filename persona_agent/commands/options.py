"""The options commands share, and what they turn into: `Settings`, the users a run reads.

Every option's default is read from `Settings` (or the command's preset of it), so the help
text, the library and the CLI never disagree. Heavy imports (DSPy, MLflow, Qdrant) happen inside
the functions that need them, so `--help` is instant."""

from __future__ import annotations

import argparse
import logging
import math
import sys
from dataclasses import fields, replace
from pathlib import Path

from persona_agent.settings import Settings


def at_least(minimum, convert=int, what="a whole number", maximum=10**9):
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


def count(minimum: int, maximum: int = 10**9):
    return at_least(minimum, maximum=maximum)


def finite(minimum: float):
    return at_least(minimum, float, "a finite number", maximum=1e6)

# Seconds: above zero (a zero timeout is no timeout) and at most a week.
seconds = at_least(1e-3, float, "a number of seconds", maximum=7 * 24 * 3600)


def store_options(p: argparse.ArgumentParser, s: Settings) -> None:
    g = p.add_argument_group("store")
    g.add_argument("--store", type=Path, default=s.store,
                   help=f"directory of the MLflow store and embedded Qdrant (default: {s.store})")
    g.add_argument("--qdrant-url", default=s.qdrant_url, help="use a Qdrant server instead of the embedded store")
    g.add_argument("--wait", dest="store_wait", type=seconds, default=s.store_wait,
                   help="seconds to wait while another process uses the embedded memory, then exit 5 "
                        f"(default {s.store_wait:g})")
    g.add_argument("--min-free-mb", type=count(0, maximum=10**9), default=s.min_free_mb,
                   help="commands that write the store (ingest, nightly, demo, forget) refuse to start, and a nightly "
                        f"commit to go on, with less free disk space than this (default {s.min_free_mb})")
    g.add_argument("--experiment", default=s.experiment, help=f"MLflow experiment name (default {s.experiment})")
    g.add_argument("--progress-every", type=seconds, default=s.progress_every,
                   help="when stderr is not a terminal (cron, nohup, a pipe), a progress line at least this often: "
                        f"done / total, elapsed, time left (default {s.progress_every:g} s; on a terminal, a bar)")
    g.add_argument("-v", "--verbose", action="store_true",
                   help="log at INFO level, and show DSPy's, GEPA's and MLflow's own progress and messages")


def lm_options(p: argparse.ArgumentParser, s: Settings) -> None:
    """The LLM's options, on the commands that call one (and then the store's)."""
    g = p.add_argument_group("LLM")
    g.add_argument("--lm", default=s.lm.model,
                   help="'local' (in-process Gemma 3 270M), 'local:/path/model.gguf', 'scripted' (a deterministic "
                        "stand-in for tests: no model, no network), or any LiteLLM model such as "
                        f"openai/gpt-4o-mini (key from the environment; default {s.lm.model})")
    g.add_argument("--api-base", default=s.lm.api_base,
                   help="endpoint for the LiteLLM model (vLLM, Ollama, llama.cpp server, ...)")
    g.add_argument("--max-tokens", type=count(1), default=s.lm.max_tokens,
                   help="ceiling on the tokens one LM call may generate; under a JSON schema (local engine, "
                        "--api-base servers) each kind of call is bounded tighter by its fields: a label, an "
                        f"80-character step thought, 600-character free text (default {s.lm.max_tokens})")
    g.add_argument("--retries", type=count(0), default=s.lm.retries,
                   help=f"retries per LM call on timeouts, 429 and 5xx, with backoff (default {s.lm.retries})")
    g.add_argument("--timeout", type=seconds, default=s.lm.timeout,
                   help=f"seconds per remote LM request (default {s.lm.timeout:g})")
    g.add_argument("--no-cache", dest="cache", action="store_false", default=s.lm.cache,
                   help="ask the LLM every time instead of answering repeated requests from DSPy's cache (for timing)")
    store_options(p, s)


def agent_options(g, s: Settings) -> None:
    g.add_argument("--top-k", "-k", type=count(0), default=s.top_k,
                   help=f"memories retrieved per query (default {s.top_k})")
    g.add_argument("--max-iters", type=count(0), default=s.max_iters,
                   help=f"ReAct steps per answer (default {s.max_iters})")
    g.add_argument("--answer-step", choices=("evidence", "prompt"), default=s.answer_step,
                   help="evidence: the persona's preferences are a prior on the LM's label log-probabilities (an LM "
                        "that gives none answers by prompting, logged); prompt: the paper's agent, the persona as "
                        f"the instruction (default {s.answer_step})")
    g.add_argument("--prior-strength", type=finite(0), default=s.prior_strength,
                   help="evidence: how much the persona weighs: for a rating tendency or topics, nats at most "
                        "added to a label; for a list of labels on a task that reads its items, any value above 0 "
                        "lets the user's order choose among the labels the item supports; on others, about how "
                        f"many labels an item supports (default {s.prior_strength:g}; 0: no persona)")
    g.add_argument("--support-margin", type=finite(0), default=s.support_margin,
                   help="evidence, tasks whose items name what they support (LaMP-2): a label the item supports "
                        "scores within this many nats of the best when the LM reads the item; the persona picks "
                        f"among those (default {s.support_margin:g})")
    g.add_argument("--trace", action="store_true", help="record MLflow traces of every agent call")


def alignment_options(p: argparse.ArgumentParser, s: Settings) -> None:
    g = p.add_argument_group("alignment")
    g.add_argument("--iterations", "-T", type=count(0), default=s.iterations,
                   help=f"alignment iterations (default {s.iterations})")
    g.add_argument("--batch", "-n", dest="batch_size", type=count(1), default=s.batch_size,
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
    g.add_argument("--holdout", type=count(0), default=s.holdout,
                   help=f"older interactions a rewrite must not score worse on either (default {s.holdout})")
    g.add_argument("--redraw-temperature", type=float, default=s.redraw_temperature,
                   help="after an iteration that shipped nothing, draw the next rewrite at this temperature "
                        f"instead of writing the same one again (default {s.redraw_temperature}; 0: greedy)")
    agent_options(g, s)


def workers_option(p: argparse.ArgumentParser, s: Settings, what: str) -> None:
    p.add_argument("--workers", type=count(1, maximum=4096), default=s.workers, help=f"{what} (default {s.workers})")


def task_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", default="lamp2m", help="lamp1, lamp2m, lamp2n or lamp3 (default lamp2m)")


def set_option(p: argparse.ArgumentParser, default: str) -> None:
    from persona_agent.data.synthetic import SETS

    p.add_argument("--set", choices=SETS, default=default,
                   help="which shipped synthetic set, without --data: users whose rule stays or drifts, items "
                        f"paraphrased or readable (default {default})")


def data_source(args, task) -> tuple[Path, str]:
    """The data directory and how runs name it: --data, or the shipped set --set names."""
    from persona_agent.data.synthetic import shipped_data_dir

    if args.data is not None:
        return args.data, str(args.data)
    return shipped_data_dir(task, args.set), "shipped" if args.set == "stable" else f"shipped:{args.set}"


def skip_bad(p: argparse.ArgumentParser) -> None:
    p.add_argument("--skip-bad", action="store_true",
                   help="skip (and count) bad records instead of stopping at the first one")


def evaluation_options(p: argparse.ArgumentParser, s: Settings, methods: str, *, out: str) -> None:
    """The data, method and output options `eval` and `sweep` share."""
    task_option(p)
    p.add_argument("--data", type=Path, help="LaMP directory or OPPU file (default: the shipped synthetic set)")
    set_option(p, "stable")
    p.add_argument("--split", help="LaMP split name when the directory holds several (dev, test, ...)")
    p.add_argument("--methods", default=methods, help=f"comma-separated method names, or 'all' (default {methods})")
    p.add_argument("--users", type=count(1), help="first N users (default all)")
    p.add_argument("--queries", type=count(1), help="first N queries per user (default all)")
    workers_option(p, s, "users evaluated in parallel")
    p.add_argument("--out", type=Path, help=f"output directory (default {out})")
    p.add_argument("--keep-going", action="store_true",
                   help="when the LLM still fails after its retries, drop that user from every method and go on "
                        "(default: stop with exit code 4 and the table of the users that finished)")
    skip_bad(p)
    alignment_options(p, s)
    lm_options(p, s)


def settings_from(args: argparse.Namespace, base: Settings) -> Settings:
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


class BadRecords(list):
    """Collects the records `--skip-bad` skipped; reports them on stderr."""

    def __call__(self, err) -> None:
        self.append(err)
        logging.getLogger("persona_agent").warning("skipped: %s", err)

    def report(self) -> None:
        if self:
            print(f"persona-agent: skipped {len(self)} bad record(s); first: {self[0]}", file=sys.stderr)


def on_bad(args) -> BadRecords | None:
    return BadRecords() if getattr(args, "skip_bad", False) else None


def trace_if_asked(args) -> None:
    """After the store is open (traces go to its experiment)."""
    if getattr(args, "trace", False):
        from persona_agent.adapters import tracking

        tracking.enable_traces()


def users_of(args, task):
    from persona_agent.data.loaders import load_users

    bad = on_bad(args)
    users = load_users(data_source(args, task)[0], task, args.split, on_bad=bad)[: args.users]
    if bad:
        bad.report()
    if args.queries is not None:
        users = [replace(u, queries=u.queries[: args.queries]) for u in users]
    return users
