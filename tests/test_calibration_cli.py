"""``a2ats calibrate`` through the CLI entry point: one-line errors, a tiny run, and one run on the embedded model."""

from __future__ import annotations

import json
import sys

import pytest

from a2ats_tools.calibration import CalibrationSet


def _main(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    from a2ats_tools.cli import main

    monkeypatch.setattr(sys, "argv", ["a2ats", "calibrate", *args])
    with pytest.raises(SystemExit) as exit_info:
        main()
    return exit_info.value.code, capsys.readouterr().err


def test_help_has_an_example(monkeypatch, capsys):
    from typer.testing import CliRunner

    from a2ats_tools.cli import app

    result = CliRunner().invoke(app, ["calibrate", "--help"])
    assert result.exit_code == 0 and "a2ats calibrate --recipe small" in result.output and "--positions" in result.output


def test_cli_errors_are_one_line(monkeypatch, capsys, tmp_path, tiny_model_dirs):
    code, err = _main(monkeypatch, capsys, "--model", str(tmp_path / "missing"), "--out", str(tmp_path / "o"))
    assert code == 2 and "error:" in err and "does not exist" in err and "Traceback" not in err
    code, err = _main(
        monkeypatch, capsys, "--model", str(tiny_model_dirs["llama"]), "--recipe", "none", "--source",
        str(tmp_path / "nothing.txt"), "--out", str(tmp_path / "o"),
    )
    assert code == 2 and "--source" in err and "does not exist" in err
    code, err = _main(monkeypatch, capsys, "--positions", "far", "--recipe", "none", "--out", str(tmp_path / "o"))
    assert code == 2 and "add one with --source" in err  # the recipe is checked before the model loads
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    code, err = _main(monkeypatch, capsys, "--model", str(tiny_model_dirs["llama"]), "--out", str(tmp_path / "taken"))
    assert code == 2 and "--overwrite" in err


def test_cli_tiny_run_with_source_and_tokens(monkeypatch, capsys, tmp_path, tiny_model_dirs):
    data = tmp_path / "notes.jsonl"
    data.write_text("\n".join(json.dumps({"text": f"Note {i}: the meeting moved to room {i % 9}."}) for i in range(60)))
    out = tmp_path / "calib"
    from a2ats_tools.cli import main

    monkeypatch.setattr(
        sys, "argv",
        ["a2ats", "calibrate", "--model", str(tiny_model_dirs["mistral"]), "--recipe", "none", "--source", str(data),
         "--tokens", "200", "--positions", "1024,2048", "--chunk-size", "64", "--out", str(out), "--quiet",
         "--allow-few-tokens"],
    )
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 0
    result = CalibrationSet(out)
    assert result.relative_positions == [1024, 2048]
    assert result.manifest["tokens"]["total"] == 200 and result.layer(0).keys.shape == (2, 200, 16)
    assert result.manifest["heldout"]["sequences"] == 1  # the rest of the notes fill a short held-out sequence
    err = capsys.readouterr().err  # --quiet: no progress bar, no summary; warnings still show
    assert "held-out data gave 1 of the 2 sequences" in err and "wrote" not in err and "tok/s" not in err


@pytest.mark.slow
def test_cli_on_embedded_model(monkeypatch, capsys, tmp_path):
    recipe = tmp_path / "tiny.toml"
    recipe.write_text(
        "name = 'tiny'\nchunk_size = 128\n[heldout]\nsource = 'pydoc'\nsequences = 1\nlength = 256\nqueries = 8\n"
        "[[sources]]\nkind = 'pydoc'\nname = 'pydoc'\ntokens = 200\n"
        "[[sources]]\nkind = 'generated'\ntokens = 40\nbatch_size = 2\nmax_new_tokens = 16\n"
        "[[sources]]\nkind = 'uuid'\ntokens = 60\n"
    )
    out = tmp_path / "calib"
    code = 0
    from a2ats_tools.cli import main

    monkeypatch.setattr(sys, "argv", ["a2ats", "calibrate", "--recipe", str(recipe), "--out", str(out), "--quiet",
                                      "--allow-few-tokens"])
    try:
        main()
    except SystemExit as exc:
        code = exc.code
    assert code in (0, None), capsys.readouterr().err
    result = CalibrationSet(out)
    m = result.manifest
    assert m["tokens"]["by_source"] == {"pydoc": 200, "generated": 40, "uuid": 60}
    assert m["geometry"]["num_layers"] == 30 and m["geometry"]["num_kv_heads"] == 3
    assert 2048 in m["relative_positions"]
    stats = result.layer(29)
    assert stats.keys.shape == (3, 300, 64) and stats.heldout_queries.shape == (1, 9, 8, 64)
