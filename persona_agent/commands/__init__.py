"""The commands `persona-agent` runs, grouped by what they are for; each module holds its
commands' options, bodies and output, and ends with their `Command` rows (`cli.COMMANDS`).

Each command opens the store it needs with `Store.open(settings, memory=...)`: where memory lives
is decided there, once per command."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Callable

from persona_agent.settings import Settings


@dataclass(frozen=True)
class Command:
    run: Callable[[Settings, argparse.Namespace], int]
    arguments: Callable[[argparse.ArgumentParser, Settings], None]
    help: str
    description: str = ""
    defaults: Callable[[], Settings] = Settings  # the Settings this command's options start from
