"""``a2ats generate`` end to end on a tiny converted checkpoint."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from a2ats_tools.cli import app

from .conftest import build_tiny_model
from .test_runtime import make_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tokenizer):
    return make_checkpoint(build_tiny_model("llama"), tmp_path_factory.mktemp("gen-ckpt"), tokenizer)


def test_generate_cli_streams_and_compares(checkpoint):
    result = CliRunner().invoke(
        app,
        ["generate", str(checkpoint), "--prompt", "The capital of France is", "-n", "6", "--budget", "100%", "--compare-dense"],
    )
    assert result.exit_code == 0, result.output
    assert "identical to dense" in result.output


def test_generate_cli_quiet_prints_text_only(checkpoint, tmp_path):
    prompt = tmp_path / "p.txt"
    prompt.write_text("Once upon a time " * 20)
    args = ["generate", str(checkpoint), "-f", str(prompt), "-n", "5", "-q", "--budget", "8", "--buckets", "log"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "tokens in" not in result.output and result.output.endswith("\n")


def test_generate_cli_user_errors(checkpoint, tmp_path):
    from a2ats_tools.errors import A2atsError

    runner = CliRunner()
    result = runner.invoke(app, ["generate", str(checkpoint)])
    assert isinstance(result.exception, A2atsError) and "--prompt" in str(result.exception)
    result = runner.invoke(app, ["generate", str(tmp_path), "-p", "hi"])
    assert isinstance(result.exception, A2atsError) and "a2ats_config.json" in str(result.exception)
    result = runner.invoke(app, ["generate", str(checkpoint), "-p", "hi", "--budget", "lots"])
    assert isinstance(result.exception, A2atsError) and "budget" in str(result.exception)
    result = runner.invoke(app, ["generate", str(checkpoint), "-p", "hi", "--rerank-aggregation", "mean"])
    assert isinstance(result.exception, A2atsError) and "rerank_aggregation" in str(result.exception)


def test_generate_cli_aggregation_options_reach_the_runtime(checkpoint, tmp_path, monkeypatch):
    """--aggregation / --rerank-aggregation end up in the loaded model's settings (and the text still comes)."""
    from a2ats_tools.runtime import loader

    seen = {}
    real = loader.load_converted

    def spy(*args, **kwargs):
        model, tok = real(*args, **kwargs)
        seen["settings"] = model.a2ats.settings
        return model, tok

    monkeypatch.setattr(loader, "load_converted", spy)
    prompt = "Once upon a time " * 20
    args = ["generate", str(checkpoint), "-p", prompt, "-n", "4", "-q", "--budget", "8", "--aggregation", "softmax",
            "--rerank-aggregation", "sum"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert seen["settings"].aggregation == "softmax" and seen["settings"].rerank_aggregation == "sum"


def test_generate_cli_task_checks_the_answer_and_reports_retrieval(checkpoint):
    """--task builds an eval sample (same numbering as a2ats eval), checks its answer and says what decode read."""
    args = ["generate", str(checkpoint), "--task", "niah_single", "--task-length", "300", "-n", "3", "--budget", "8",
            "--compare-dense"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert result.output.count("expected ") == 2  # A²ATS and dense, each checked
    assert "cached rows attended per KV head" in result.output and "in 2 of 2 layers" in result.output


def test_answer_verdict_says_found_partly_or_missed():
    from a2ats_tools.commands.generate import answer_verdict
    from a2ats_tools.evaluation.tasks import TaskSample

    one = TaskSample("passkey", 300, 0, "prompt", ["12345"])
    assert "found" in answer_verdict(one, " 12345.") and "12345" in answer_verdict(one, "")
    assert "missed" in answer_verdict(one, " 123456")
    two = TaskSample("niah_multivalue", 300, 0, "prompt", ["111", "222"])
    assert "partly found" in answer_verdict(two, "111 and 333")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--task", "riddles"], "passkey"),
        (["--task", "passkey", "-p", "hi"], "exactly one"),
        (["--task", "passkey", "--task-length", "50"], "--task-length"),
        (["--task", "passkey", "--chat"], "--chat"),
        (["-p", "hi", "--haystack", "x.txt"], "--haystack"),
        (["-p", "hi", "--kernels", "cuda"], "kernels"),
    ],
)
def test_generate_cli_task_and_kernel_errors(checkpoint, args, message):
    from a2ats_tools.errors import A2atsError

    result = CliRunner().invoke(app, ["generate", str(checkpoint), *args])
    assert isinstance(result.exception, A2atsError) and message in str(result.exception)


def test_retrieval_summary_says_when_no_step_retrieved(checkpoint):
    from a2ats_tools.commands.generate import retrieval_summary
    from a2ats_tools.runtime.loader import load_converted

    model, _ = load_converted(checkpoint)
    assert "never outgrew" in retrieval_summary(model.a2ats.new_cache())
