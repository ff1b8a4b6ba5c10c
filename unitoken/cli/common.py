"""What every command group of the ``unitoken`` command shares: the consoles, the usage error,
``--help`` examples, the device and progress-bar helpers."""

from __future__ import annotations

import argparse

from rich.console import Console
from rich.table import Table

console = Console(stderr=False)
err_console = Console(stderr=True)
HELP_FORMAT = argparse.RawDescriptionHelpFormatter


class UsageError(Exception):
    """Bad command-line usage (exit 2)."""


def epilog(examples: list[str], notes: str = "") -> str:
    """The end of a ``--help``: an "Example(s):" section, one ``unitoken ...`` line each, then ``notes``."""
    head = "Examples:" if len(examples) > 1 else "Example:"
    return "\n".join([head, *(f"  {e}" for e in examples)]) + (f"\n\n{notes}" if notes else "")


def command(sub, name: str, help: str, examples: list[str], handler, notes: str = "") -> argparse.ArgumentParser:
    """A sub-command that runs ``handler(args)`` and shows ``examples`` at the end of its ``--help``."""
    parser = sub.add_parser(name, help=help, description=help, epilog=epilog(examples, notes),
                            formatter_class=HELP_FORMAT)
    parser.set_defaults(handler=handler)
    return parser


class Group:
    """A command group (``unitoken data ...``): its ``--help`` lists the examples of its commands."""

    def __init__(self, sub, name: str, help: str) -> None:
        self.parser = sub.add_parser(name, help=help, description=help, formatter_class=HELP_FORMAT)
        self.sub = self.parser.add_subparsers(dest=f"{name}_command", required=True)
        self.examples: list[str] = []

    def command(self, name: str, help: str, examples: list[str], handler, notes: str = "") -> argparse.ArgumentParser:
        parser = command(self.sub, name, help, examples, handler, notes)
        self.examples += examples
        self.parser.epilog = epilog(self.examples)
        return parser


def add_overrides(parser: argparse.ArgumentParser, help: str = "recipe override (repeatable)") -> None:
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=help)


def device(name: str) -> str:
    """``--device``: ``auto`` as ``unitoken.model.devices.pick_device`` decides (imported when a
    command needs it: torch is not loaded for ``--help``)."""
    from unitoken.model.devices import pick_device

    return pick_device(name)


def progress(description: str):
    """A rich progress bar usable as a ``progress(done, total)`` callback."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

    bar = Progress("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
                   TimeRemainingColumn(), console=err_console, transient=True)
    task = bar.add_task(description, total=None)

    def update(done: int, total: int) -> None:
        bar.update(task, completed=done, total=total)

    return bar, update


def count_table(title: str, what: str, counts: dict, value: str = "count") -> Table:
    """A two-column table of ``counts`` (module -> parameters, kind -> files, ...)."""
    table = Table(title=title)
    table.add_column(what)
    table.add_column(value, justify="right")
    for key, n in counts.items():
        table.add_row(key, f"{n:,}")
    return table
