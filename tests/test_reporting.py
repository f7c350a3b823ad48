"""The reporting layer: library calls report nothing by default; the CLI's console reporter shows everything,
or under ``quiet`` only the warnings."""

from __future__ import annotations

from rich.table import Table

from a2ats_tools.reporting import ConsoleReporter, Reporter


class Recording(Reporter):
    """Keeps every message (kind, text) and each bar's total and steps, for tests."""

    quiet = False

    def __init__(self):
        self.messages: list[tuple[str, str]] = []
        self.bars: list[dict] = []

    def info(self, message, *, markup=False):
        self.messages.append(("info", message))

    def note(self, message):
        self.messages.append(("note", message))

    def warn(self, message):
        self.messages.append(("warn", message))

    def table(self, renderable):
        self.messages.append(("table", getattr(renderable, "title", "")))

    def progress(self, description, total, unit=None):
        from contextlib import contextmanager

        from a2ats_tools.reporting import Bar

        record = {"description": description, "total": total, "done": 0}
        self.bars.append(record)

        class Counting(Bar):
            def advance(self, steps=1, description=None):
                record["done"] += steps

        @contextmanager
        def bar():
            yield Counting()

        return bar()

    def kinds(self, kind: str) -> list[str]:
        return [text for k, text in self.messages if k == kind]


def _table(title: str) -> Table:
    table = Table(title=title)
    table.add_column("column")
    table.add_row("cell")
    return table


def _everything(reporter: Reporter) -> None:
    reporter.info("an [info] line")
    reporter.note("a [note]")
    reporter.warn("a [warning]")
    reporter.table(_table("a table"))
    with reporter.progress("steps", 3) as bar:
        for _ in range(3):
            bar.advance()
        bar.describe("done")


def test_the_base_reporter_says_nothing(capsys):
    _everything(Reporter())
    assert capsys.readouterr() == ("", "")


def test_the_console_reporter_writes_to_stderr_and_quiet_keeps_the_warnings(capsys):
    _everything(ConsoleReporter())
    captured = capsys.readouterr()
    assert captured.out == ""
    for text in ("an [info] line", "note: a [note]", "warning: a [warning]", "a table", "done", "3/3"):
        assert text in captured.err  # brackets in messages are text, not markup
    _everything(ConsoleReporter(quiet=True))
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.strip() == "warning: a [warning]"


def test_tables_can_go_to_stdout(capsys):
    ConsoleReporter(stderr=False).table(_table("results"))
    captured = capsys.readouterr()
    assert "results" in captured.out and captured.err == ""
