"""Render the CLI reference (``docs/cli.md``) from the commands' own ``--help`` metadata, so the two never drift.

    python -m a2ats_tools.cli_reference            # rewrite docs/cli.md
    python -m a2ats_tools.cli_reference --check    # exit 1 if docs/cli.md is out of date (the tests do this)
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import typer

DOC = Path(__file__).resolve().parents[1] / "docs" / "cli.md"
_EXAMPLE_STARTS = ("a2ats ", "accelerate ", "torchrun ", "python ")
_MARKUP = re.compile(r"\[/?[a-z ]*\]")  # rich markup such as [bold] ... [/]


def _plain(text: str) -> str:
    return _MARKUP.sub("", text or "").strip()


def _cell(text: str) -> str:
    return _plain(text).replace("|", "\\|").replace("\n", " ")


def _default(param) -> str:
    if getattr(param, "is_flag", False):
        return "off" if not param.default else "on"
    value = param.default
    if value is None or value == "" or callable(value):
        return ""
    return f"`{value}`"


def _param_row(param) -> str:
    if param.param_type_name == "argument":
        name = f"`{param.name.upper()}`"
        kind = "argument" + (", required" if param.required else "")
        return f"| {name} | {kind} | | {_cell(getattr(param, 'help', '') or '')} |"
    names = ", ".join(f"`{o}`" for o in (*param.opts, *param.secondary_opts))
    kind = "flag" if getattr(param, "is_flag", False) else param.bare_type().lower()
    return f"| {names} | {kind} | {_default(param)} | {_cell(param.help or '')} |"


def _command_section(name: str, command) -> list[str]:
    lines = [f"## `a2ats {name}`", ""]
    help_text = _plain(command.help or "")
    paragraphs = [p.strip() for p in help_text.split("\n\n") if p.strip()]
    examples: list[str] = []
    for p in paragraphs:
        if p.startswith(_EXAMPLE_STARTS):
            examples.append(" ".join(p.split()))
        elif p.rstrip(":").lower() == "examples":
            continue
        else:
            lines += [" ".join(p.split()), ""]
    if examples:
        lines += ["```bash", *examples, "```", ""]
    lines += ["| option | type | default | meaning |", "|---|---|---|---|"]
    lines += [_param_row(p) for p in command.params if p.name != "help"]
    return lines + [""]


def render() -> str:
    """The whole reference as Markdown."""
    from .cli import app

    group = typer.main.get_command(app)
    lines = [
        "# CLI reference",
        "",
        "Generated from the commands' `--help` by `python -m a2ats_tools.cli_reference` (a test fails when this page",
        "and the code disagree). Every command also answers `--help` with the same text, formatted for a terminal.",
        "Input errors print one red line and exit 2; `A2ATS_DEBUG=1` shows the traceback.",
        "",
        _plain(group.help or ""),
        "",
    ]
    for name, command in group.commands.items():
        lines += _command_section(name, command)
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    text = render()
    if "--check" in argv:
        if not DOC.is_file() or DOC.read_text(encoding="utf-8") != text:
            print(f"{DOC} is out of date: run python -m a2ats_tools.cli_reference", file=sys.stderr)
            return 1
        return 0
    DOC.write_text(text, encoding="utf-8")
    print(f"wrote {DOC}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
