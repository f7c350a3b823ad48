"""Progress, messages and tables, reported through a :class:`Reporter` the caller passes.

Library code never prints: it takes ``reporter`` and calls it. The base :class:`Reporter` reports nothing, so a
Python caller sees no output unless it passes one; the CLI commands build a :class:`ConsoleReporter` (rich, on
stderr), which under ``quiet`` shows warnings only.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


class Bar:
    """One progress bar; this one shows nothing."""

    def advance(self, steps: float = 1, description: str | None = None) -> None:
        """``steps`` more done, and optionally a new description."""

    def describe(self, description: str) -> None:
        """A new description, nothing more done."""


class Reporter:
    """Reports nothing: the default of every library function that takes a ``reporter``."""

    quiet = True  # nothing but warnings is shown: library code may then also silence third-party output

    def info(self, message: str, *, markup: bool = False) -> None:
        """A status line (plain text, or rich markup with ``markup``)."""

    def note(self, message: str) -> None:
        """A remark worth knowing, shown as ``note: message``."""

    def warn(self, message: str) -> None:
        """Something the user should act on, shown as ``warning: message`` (even when quiet)."""

    def table(self, renderable: Any) -> None:
        """A rich renderable, usually a :class:`rich.table.Table`."""

    @contextmanager
    def progress(self, description: str, total: float, unit: str | None = None) -> Iterator[Bar]:
        """A progress bar of ``total`` steps for the ``with`` block; ``unit`` (e.g. ``tok``) shows counts with
        that unit, a rate and a time remaining instead of ``done/total``."""
        yield Bar()


class ConsoleReporter(Reporter):
    """Reports on a rich console (stderr unless ``stderr=False``); ``quiet`` keeps only the warnings."""

    def __init__(self, quiet: bool = False, *, stderr: bool = True):
        self.quiet = quiet
        self.console = Console(stderr=stderr)

    def info(self, message: str, *, markup: bool = False) -> None:
        if not self.quiet:
            self.console.print(message, markup=markup, highlight=False)

    def note(self, message: str) -> None:
        if not self.quiet:
            self.console.print(f"[yellow]note:[/] {escape(message)}", highlight=False)

    def warn(self, message: str) -> None:
        self.console.print(f"[yellow]warning:[/] {escape(message)}", highlight=False)

    def table(self, renderable: Any) -> None:
        if not self.quiet:
            self.console.print(renderable)

    @contextmanager
    def progress(self, description: str, total: float, unit: str | None = None) -> Iterator[Bar]:
        if self.quiet:
            yield Bar()
            return
        with Progress(*_columns(unit), console=self.console) as progress:
            yield _RichBar(progress, progress.add_task(description, total=total, rate=""), unit)


def _columns(unit: str | None) -> list[ProgressColumn]:
    if unit is None:
        return [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    return [
        TextColumn("{task.description}"), BarColumn(),
        TextColumn(f"{{task.completed:,.0f}}/{{task.total:,.0f}} {unit}"), TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
    ]


class _RichBar(Bar):
    def __init__(self, progress: Progress, task: Any, unit: str | None):
        self.progress, self.task, self.unit = progress, task, unit

    def advance(self, steps: float = 1, description: str | None = None) -> None:
        fields: dict[str, Any] = {"description": description} if description else {}
        self.progress.update(self.task, advance=steps, **fields)
        speed = next(t.speed for t in self.progress.tasks if t.id == self.task) if self.unit else None
        if speed:
            self.progress.update(self.task, rate=f"{speed:,.0f} {self.unit}/s")

    def describe(self, description: str) -> None:
        self.progress.update(self.task, description=description)
