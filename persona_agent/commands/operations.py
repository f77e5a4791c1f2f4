"""`doctor`, `backup` and `forget`: keeping a store well, with their options and output."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

from persona_agent.commands import Command
from persona_agent.commands.options import store_options
from persona_agent.data.loaders import shown
from persona_agent.settings import Settings, sqlite_file


def doctor_options(p, s):
    store_options(p, s)


def doctor_command(settings: Settings, args) -> int:
    from persona_agent.operations.doctor import doctor, print_findings

    findings = doctor(settings)
    print_findings(findings)
    return 6 if any(f.status == "damaged" for f in findings) else 1 if any(f.status == "unfinished" for f in findings) else 0


DOCTOR = Command(doctor_command, doctor_options, "check a store: memory, each user's history, MLflow's database, leftovers", "Read every part of the store back, change nothing, and say what to do about what is wrong " "(exit 6 when something is damaged).")


def backup_options(p, s):
    p.add_argument("dest", type=Path, help="a new directory for the copy (must not exist)")
    store_options(p, s)


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


BACKUP = Command(backup_command, backup_options, "copy the store consistently (memory, MLflow database, state)", "Copy the store to DEST while no nightly and no memory writer runs, then check the copy.")


def forget_options(p, s):
    p.add_argument("user", help="the user id, as in their events")
    store_options(p, s)


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


FORGET = Command(forget_command, forget_options, "erase a user: memories, personas, state, their rows in runs, " "traces, cached LM answers", "Remove every byte the store, the tracking store and the LM cache " "hold of USER, and record the erasure without their id. Idempotent.")
