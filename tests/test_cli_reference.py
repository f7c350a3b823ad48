"""docs/cli.md is generated from the commands' --help metadata and must match the code."""

from __future__ import annotations

from a2ats_tools import cli_reference


def test_cli_reference_is_in_step_with_help():
    text = cli_reference.render()
    for command in ("calibrate", "convert", "generate", "eval", "bench"):
        assert f"## `a2ats {command}`" in text
    assert "| `--budget`, `-b` |" in text  # options come from the commands themselves
    assert cli_reference.main(["--check"]) == 0, "docs/cli.md is stale: run python -m a2ats_tools.cli_reference"


def test_reflow_help_joins_prose_and_keeps_examples_and_lists():
    from a2ats_tools.cli import reflow_help

    doc = """First line.

    A hard-wrapped
    paragraph of prose.

    Examples:

      a2ats bench runs/ckpt
      a2ats bench runs/ckpt --offload

    - one item
    - two items
    """
    assert reflow_help(doc) == (
        "First line.\n\nA hard-wrapped paragraph of prose.\n\nExamples:\n\n"
        "  a2ats bench runs/ckpt\n  a2ats bench runs/ckpt --offload\n\n- one item\n- two items"
    )
