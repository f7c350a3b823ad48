"""The ``a2ats`` command line: calibrate → convert → generate, plus eval and bench.

Errors caused by input (missing model, bad data, existing output, ...) print one red line and exit 2;
they never show a traceback. Ctrl-C prints one line naming the command and exits 130. Set ``A2ATS_DEBUG=1``
to see the traceback anyway.
"""

from __future__ import annotations

import functools
import inspect
import os
import sys
from collections.abc import Callable

import typer
from rich.console import Console

from . import __version__
from .errors import A2atsError, Interrupted

app = typer.Typer(
    name="a2ats",
    help=(
        "Turn a Hugging Face RoPE language model into an A²ATS retrieval-attention checkpoint, and run it.\n\n"
        "Pipeline: [bold]a2ats calibrate[/] (capture keys and query statistics) → [bold]a2ats convert[/] "
        "(train query-aware VQ codebooks, write a checkpoint) → [bold]a2ats generate[/] (decode with "
        "retrieval attention). [bold]a2ats eval[/] and [bold]a2ats bench[/] compare quality and speed "
        "against dense attention."
    ),
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
    add_completion=False,
)
err_console = Console(stderr=True)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"a2ats-tools {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    """a2ats-tools command line."""


def reflow_help(doc: str | None) -> str:
    """A docstring as help text: hard-wrapped prose lines joined, so the terminal wraps them.

    Lines that start with whitespace (examples) or a list marker keep their own line; blank lines still
    separate paragraphs.
    """
    paragraphs = []
    for paragraph in inspect.cleandoc(doc or "").split("\n\n"):
        lines: list[str] = []
        for line in paragraph.splitlines():
            keep = not lines or line[:1].isspace() or line.lstrip().startswith(("- ", "* ", "• "))
            if keep or lines[-1][:1].isspace():
                lines.append(line)
            else:
                lines[-1] += " " + line.strip()
        paragraphs.append("\n".join(lines))
    return "\n\n".join(paragraphs)


def _command(name: str, fn: Callable[..., object], **kwargs: object) -> None:
    app.command(name=name, help=reflow_help(fn.__doc__), **kwargs)(_reporting_interrupts(name, fn))


def _reporting_interrupts(name: str, fn: Callable[..., object]) -> Callable[..., object]:
    """``fn`` with Ctrl-C turned into :class:`Interrupted`: Typer maps a ``KeyboardInterrupt`` leaving a
    command to a silent exit 130, so the command's name must be attached before it gets there."""

    @functools.wraps(fn)
    def run(*args: object, **kwargs: object) -> object:
        try:
            return fn(*args, **kwargs)
        except KeyboardInterrupt:
            raise Interrupted(name) from None

    return run


def _register() -> None:
    from .commands import bench, calibrate, convert, evaluate, generate

    _command("calibrate", calibrate.calibrate, no_args_is_help=False)
    _command("convert", convert.convert)
    _command("eval", evaluate.evaluate)
    _command("bench", bench.bench)
    _command("generate", generate.generate)


_register()


def main() -> None:
    """Console-script entry point with one-line errors."""
    try:
        app()
    except A2atsError as exc:
        if os.environ.get("A2ATS_DEBUG"):
            raise
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except Interrupted as exc:
        if os.environ.get("A2ATS_DEBUG"):
            raise
        err_console.print(f"[yellow]interrupted:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
