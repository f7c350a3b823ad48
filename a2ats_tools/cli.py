"""The ``a2ats`` command line: calibrate → convert → generate, plus eval and bench.

Errors caused by input (missing model, bad data, existing output, ...) print one red line and exit 2;
they never show a traceback. Set ``A2ATS_DEBUG=1`` to see the traceback anyway.
"""

from __future__ import annotations

import os
import sys

import typer
from rich.console import Console

from . import __version__
from .errors import A2atsError

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


def _register() -> None:
    from .commands import calibrate

    app.command(name="calibrate", no_args_is_help=False)(calibrate.calibrate)
    from .commands import convert

    app.command(name="convert")(convert.convert)
    from .commands import bench, evaluate

    app.command(name="eval")(evaluate.evaluate)
    app.command(name="bench")(bench.bench)
    from .commands import generate

    app.command(name="generate")(generate.generate)


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
    except KeyboardInterrupt:
        err_console.print("[yellow]interrupted[/]: nothing partial was left that loads as valid")
        sys.exit(130)


if __name__ == "__main__":
    main()
