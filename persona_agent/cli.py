"""The `persona-agent` command."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from .config import Settings, offline_environment
from .llm import LMConfig


def _common(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("store and models")
    g.add_argument("--store", type=Path, default=Path("mlruns"),
                   help="directory of the MLflow store and embedded Qdrant (default: mlruns)")
    g.add_argument("--lm", default="local",
                   help="'local' (in-process Gemma 3 270M), 'local:/path/model.gguf', or any LiteLLM model "
                        "such as openai/gpt-4o-mini (key from the environment)")
    g.add_argument("--api-base", help="endpoint for the LiteLLM model (vLLM, Ollama, llama.cpp server, ...)")
    g.add_argument("--retries", type=int, default=3,
                   help="retries per LM call on timeouts, 429 and 5xx, with backoff (default 3)")
    g.add_argument("--timeout", type=float, default=120.0, help="seconds per remote LM request (default 120)")
    g.add_argument("--qdrant-url", help="use a Qdrant server instead of the embedded store")
    g.add_argument("--experiment", default="persona-agent", help="MLflow experiment name")
    g.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")


def _alignment(p: argparse.ArgumentParser, iterations: int, batch: int, max_iters: int) -> None:
    g = p.add_argument_group("alignment")
    g.add_argument("--iterations", "-T", type=int, default=iterations, help=f"alignment iterations (default {iterations})")
    g.add_argument("--batch", "-n", type=int, default=batch, help=f"latest interactions per iteration (default {batch})")
    g.add_argument("--top-k", "-k", type=int, default=5, help="memories retrieved per query (default 5)")
    g.add_argument("--max-iters", type=int, default=max_iters, help=f"ReAct steps per answer (default {max_iters})")
    g.add_argument("--loss", choices=["per_interaction", "batch"], default="per_interaction",
                   help="critique each interaction (the paper) or the whole batch in one LM call")
    g.add_argument("--no-guard", dest="guard", action="store_false",
                   help="accept every rewrite (the paper's loop) instead of only those that do not score worse")
    g.add_argument("--holdout", type=int, default=0,
                   help="older interactions a rewrite must not score worse on either (default 0)")
    g.add_argument("--trace", action="store_true", help="record MLflow traces of every agent call")


def _evaluation(p: argparse.ArgumentParser, methods: str, out: str) -> None:
    """The data, method and output options `eval` and `sweep` share."""
    p.add_argument("--task", default="lamp2m", help="lamp1, lamp2m, lamp2n or lamp3 (default lamp2m)")
    p.add_argument("--data", type=Path, help="LaMP directory or OPPU file (default: the shipped synthetic set)")
    p.add_argument("--split", help="LaMP split name when the directory holds several (dev, test, ...)")
    p.add_argument("--methods", default=methods, help=f"comma-separated method names, or 'all' (default {methods})")
    p.add_argument("--users", type=int, help="first N users (default all)")
    p.add_argument("--queries", type=int, help="first N queries per user (default all)")
    p.add_argument("--workers", type=int, default=2, help="users evaluated in parallel (default 2)")
    p.add_argument("--out", type=Path, help=f"output directory (default {out})")
    _skip_bad(p)
    _alignment(p, iterations=3, batch=3, max_iters=1)
    _common(p)


def _skip_bad(p: argparse.ArgumentParser) -> None:
    p.add_argument("--skip-bad", action="store_true",
                   help="skip (and count) bad records instead of stopping at the first one")


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


def _settings(args) -> Settings:
    return Settings(store=args.store, lm=LMConfig(model=args.lm, api_base=args.api_base, retries=args.retries,
                                                    timeout=args.timeout), qdrant_url=args.qdrant_url,
                    experiment=args.experiment, top_k=getattr(args, "top_k", 5),
                    batch_size=getattr(args, "batch", 3), iterations=getattr(args, "iterations", 3),
                    max_iters=getattr(args, "max_iters", 2), loss=getattr(args, "loss", "per_interaction"),
                    guard=getattr(args, "guard", True), holdout=getattr(args, "holdout", 0))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="persona-agent", description=__doc__ + " Per-user personas, aligned at test time.")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="align a few users of a shipped task end to end and print the scores",
                          description="Build memory, profile and persona for a few users, align them, and score "
                                      "before/after alignment against a non-personalized baseline.")
    demo.add_argument("--task", default="lamp2m", help="lamp1, lamp2m, lamp2n or lamp3 (default lamp2m)")
    demo.add_argument("--users", type=int, default=3, help="how many users (default 3)")
    demo.add_argument("--queries", type=int, default=3, help="held-out queries per user (default 3)")
    demo.add_argument("--data", type=Path, help="LaMP/OPPU data instead of the shipped synthetic set")
    _alignment(demo, iterations=2, batch=2, max_iters=1)
    _common(demo)

    ev = sub.add_parser("eval", help="score every method (the paper's table) on LaMP-format data",
                        description="Run the chosen methods on each user's queries and write the results table "
                                    "(CSV, markdown), per-method predictions in LaMP's golds format, and MLflow runs.")
    _evaluation(ev, methods="all", out="<store>/eval/<task>-<time>")

    sw = sub.add_parser("sweep", help="test-time scaling: vary n, T, K or the history kept (cold start)",
                        description="Evaluate methods at each value of one setting; writes sweep_<param>.csv "
                                    "and a PNG plot, also as MLflow artifacts.")
    sw.add_argument("param", choices=["batch", "iterations", "top_k", "history"],
                    help="alignment batch n, iterations T, retrieved memories K, or history items per user")
    sw.add_argument("values", help="comma-separated integers, e.g. 1,2,3 (history: 10 for the paper's cold start)")
    _evaluation(sw, methods="persona-agent,non-personalized", out="<store>/sweeps")

    ing = sub.add_parser("ingest", help="add new interactions to episodic memory (idempotent)",
                         description="Append a JSONL event log ({user_id, input, response, timestamp, id?} per line) "
                                     "or LaMP/OPPU files to memory. Re-ingesting the same file adds nothing.")
    ing.add_argument("path", type=Path, help="events .jsonl, a LaMP directory, or a LaMP/OPPU JSON file")
    ing.add_argument("--task", default="lamp2m")
    ing.add_argument("--split")
    _skip_bad(ing)
    _common(ing)

    night = sub.add_parser("nightly", help="re-align users whose history changed; resumable, one run per store",
                           description="Refresh semantic memory and re-align exactly the users with new interactions. "
                                       "A killed run is finished by the next one; a second concurrent run refuses to start.")
    night.add_argument("--task", default="lamp2m")
    night.add_argument("--workers", type=int, default=4, help="users aligned concurrently (default 4)")
    night.add_argument("--executor", choices=["thread", "ray"], default="thread",
                       help="threads in this process, or a Ray cluster (RAY_ADDRESS, else a local one)")
    _alignment(night, iterations=3, batch=3, max_iters=1)
    _common(night)

    make = sub.add_parser("make-data", help="generate LaMP-format data with measurable personalization",
                          description="Write {split}_questions.json, {split}_outputs.json and rules.json (each "
                                      "user's latent preference rule).")
    make.add_argument("out", type=Path, help="output directory")
    make.add_argument("--task", default="lamp2m", help="lamp1, lamp2m, lamp2n or lamp3")
    make.add_argument("--users", type=int, default=20)
    make.add_argument("--history", type=int, default=40, help="history items per user")
    make.add_argument("--queries", type=int, default=6, help="queries per user")
    make.add_argument("--split", default="dev")
    make.add_argument("--seed", type=int, default=0)

    personas = sub.add_parser("personas", help="inspect, compare and roll back personas in the MLflow prompt registry")
    psub = personas.add_subparsers(dest="action", required=True)
    for name, help_ in (("list", "users with personas: versions and the production version"),
                        ("show", "a persona's text (production, or --version V)"),
                        ("history", "every version of a user's persona with scores, acceptance and cost"),
                        ("diff", "unified diff between two versions"),
                        ("rollback", "make an earlier version the production one")):
        p = psub.add_parser(name, help=help_, description=help_)
        if name != "list":
            p.add_argument("user", help="user id")
        if name == "show":
            p.add_argument("--version", type=int, help="version number (default: production)")
        if name == "diff":
            p.add_argument("v1", type=int)
            p.add_argument("v2", type=int)
        if name == "rollback":
            p.add_argument("--to", type=int, required=True, help="version to serve")
        p.add_argument("--task", default="lamp2m", help="task of the personas (default lamp2m)")
        _common(p)

    answer = sub.add_parser("answer", help="answer a query as USER's agent, with their production persona",
                            description="Serve one query: the production persona, the user's memory, the agent.")
    answer.add_argument("user", help="user id")
    answer.add_argument("query", help="the request, in the task's input format")
    answer.add_argument("--task", default="lamp2m", help="task (default lamp2m)")
    answer.add_argument("--top-k", "-k", type=int, default=5, help="memories retrieved (default 5)")
    answer.add_argument("--max-iters", type=int, default=1, help="ReAct steps (default 1)")
    answer.add_argument("--trace", action="store_true", help="record an MLflow trace of the call")
    _common(answer)

    compare = sub.add_parser("compare", help="metric deltas between two runs, per user and overall",
                             description="B - A for every metric both runs (and their per-user runs) logged.")
    compare.add_argument("run_a")
    compare.add_argument("run_b")
    _common(compare)
    return parser


def main(argv: list[str] | None = None) -> int:
    offline_environment()
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if getattr(args, "verbose", False) else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    from dspy.utils.exceptions import LMError
    from mlflow.exceptions import MlflowException

    from .eval.tasks import TaskDataError, get_task

    try:
        if args.command == "make-data":
            from .eval.synthetic import write_dataset

            out = write_dataset(args.out, get_task(args.task), split=args.split, n_users=args.users,
                                n_history=args.history, n_queries=args.queries, seed=args.seed)
            print(f"wrote {args.users} users of {get_task(args.task).name} to {out}")
        elif args.command == "demo":
            from .demo import run_demo

            _trace_if_asked(args, _settings(args))
            run_demo(_settings(args), args.task, args.users, args.queries, args.data)
        elif args.command == "eval":
            _eval(args, get_task(args.task))
        elif args.command == "sweep":
            _sweep(args, get_task(args.task))
        elif args.command == "ingest":
            from .pipelines.ingest import ingest
            from .pipelines.memory import EpisodicMemory

            settings = _settings(args)
            settings.store.mkdir(parents=True, exist_ok=True)
            memory = EpisodicMemory.open(path=str(settings.qdrant_path), url=settings.qdrant_url)
            bad = _on_bad(args)
            try:
                report = ingest(memory, args.path, get_task(args.task), args.split, bad)
            finally:
                memory.close()
            print(f"read {report.read} interactions of {report.users} users: {report.added} new, "
                  f"{report.already_known} already in memory" + (f", {len(bad)} bad records skipped" if bad else ""))
            if bad:
                bad.report()
        elif args.command == "nightly":
            from .nightly import NightlyLocked, print_summary, run_nightly

            _trace_if_asked(args, _settings(args))
            try:
                summary = run_nightly(_settings(args), get_task(args.task), args.workers, executor=args.executor)
            except NightlyLocked as err:
                print(f"persona-agent: {err}", file=sys.stderr)
                return 3
            print_summary(summary)
            return 1 if summary.failed else 0
        elif args.command == "personas":
            _personas(args, get_task(args.task))
        elif args.command == "answer":
            print(_answer(args, get_task(args.task)))
        elif args.command == "compare":
            from . import tracking
            from .compare import compare_runs

            tracking.setup(_settings(args))
            table = compare_runs(args.run_a, args.run_b)
            print(table.to_string(index=False, float_format="%.3f") if len(table) else "no metrics in common")
    except (TaskDataError, LookupError, ValueError, MlflowException) as err:
        print(f"persona-agent: {err}", file=sys.stderr)
        return 2
    except LMError as err:  # still failing after the retries: an outage or a wrong --lm/--api-base/key
        print(f"persona-agent: the LLM failed after {getattr(args, 'retries', 0)} retries: {' '.join(str(err).split())[:500]}",
              file=sys.stderr)
        return 4
    return 0


def _users(args, task):
    from dataclasses import replace

    from .eval.data import load_users
    from .eval.synthetic import shipped_data_dir

    bad = _on_bad(args)
    users = load_users(args.data or shipped_data_dir(task), task, args.split, bad)[: args.users]
    if bad:
        bad.report()
    if args.queries is not None:
        users = [replace(u, queries=u.queries[: args.queries]) for u in users]
    return users


def _sweep(args, task) -> None:
    from .pipelines.methods import resolve
    from .sweep import sweep

    try:
        values = [int(v) for v in args.values.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"sweep values must be comma-separated integers, not {args.values!r}") from None
    settings = _settings(args)
    table = sweep(settings, task, _users(args, task), resolve(args.methods), args.param, values,
                  args.out or settings.store / "sweeps", args.workers)
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))


def _eval(args, task) -> None:
    from .evaluate import default_out, evaluate
    from .pipelines.methods import resolve

    methods = resolve(args.methods)
    users = _users(args, task)
    settings = _settings(args)
    _trace_if_asked(args, settings)
    evaluate(settings, task, users, methods, args.out or default_out(settings, task), args.workers)


def _personas(args, task) -> None:
    from . import tracking
    from .registry import PersonaRegistry

    tracking.setup(_settings(args))
    registry = PersonaRegistry(task)
    if args.action == "list":
        table = registry.users()
        print(table.to_string(index=False) if len(table) else "no personas registered yet")
    elif args.action == "show":
        print(registry.get(args.user, args.version).persona.render())
    elif args.action == "history":
        table = registry.history(args.user)
        if table.empty:
            raise LookupError(f"{task.key} user {args.user!r} has no persona in the registry")
        print(table.to_string(index=False))
    elif args.action == "diff":
        print(registry.diff(args.user, args.v1, args.v2) or "identical")
    elif args.action == "rollback":
        registry.rollback(args.user, args.to)
        print(f"{args.user}: production is now version {args.to}")


def _answer(args, task) -> str:
    from . import tracking
    from .serve import answer

    settings = _settings(args)
    tracking.setup(settings)
    _trace_if_asked(args, settings)
    return answer(settings, task, args.user, args.query)


def _trace_if_asked(args, settings: Settings) -> None:
    if getattr(args, "trace", False):
        from . import tracking

        tracking.setup(settings)
        tracking.enable_traces()


if __name__ == "__main__":
    sys.exit(main())
