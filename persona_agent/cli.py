"""The `persona-agent` command: the table of commands (each a small function of `Settings`, with
its options and output beside it in `persona_agent.commands`), and what an error means to the
shell (`exit_codes`). Heavy imports (DSPy, MLflow, Qdrant) happen inside the command that needs
them, so `--help` is instant.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
from typing import Callable

from persona_agent.commands import Command, data, measuring, nightly, operations, serving
from persona_agent.commands.options import settings_from
from persona_agent.settings import Settings, offline_environment

COMMANDS: dict[str, Command] = {
    "demo": measuring.DEMO,
    "eval": measuring.EVAL,
    "sweep": measuring.SWEEP,
    "ingest": data.INGEST,
    "nightly": nightly.NIGHTLY,
    "make-data": data.MAKE_DATA,
    "personas": serving.PERSONAS,
    "answer": serving.ANSWER,
    "report": nightly.REPORT,
    "log-model": serving.LOG_MODEL,
    "doctor": operations.DOCTOR,
    "backup": operations.BACKUP,
    "forget": operations.FORGET,
    "compare": measuring.COMPARE,
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
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if not verbose:
        _quiet_libraries()
    command = COMMANDS[args.command]
    settings = command.defaults()
    try:
        settings = settings_from(args, settings) if hasattr(args, "store") else settings
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
        ((StoreDamaged,), 6, lambda settings,
         err: f"{err}; `persona-agent doctor --store {shlex.quote(str(settings.store))}` "
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
