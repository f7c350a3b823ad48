"""docs/cli.md is generated from the commands' --help metadata and must match the code."""

from __future__ import annotations

from a2ats_tools import cli_reference


def test_cli_reference_is_in_step_with_help():
    text = cli_reference.render()
    for command in ("calibrate", "convert", "generate", "eval", "bench"):
        assert f"## `a2ats {command}`" in text
    assert "| `--budget`, `-b` |" in text  # options come from the commands themselves
    assert cli_reference.main(["--check"]) == 0, "docs/cli.md is stale: run python -m a2ats_tools.cli_reference"
