"""calibrate → convert end to end: a tiny model (fast) and the embedded SmolLM2 with a small recipe (slow)."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from a2ats_tools.artifacts.checkpoint import read_codebooks, read_config
from a2ats_tools.calibration import calibrate, load_recipe
from a2ats_tools.calibration.recipe import HeldoutSpec
from a2ats_tools.quantization import convert

from .conftest import build_tiny_model


def _recipe(tokens: int, held_length: int):
    """The small recipe without its model-generated source (generation is the slow part), scaled to ``tokens``."""
    small = load_recipe("small")
    sources = tuple(s for s in small.sources if s.label != "generated")
    recipe = replace(small, sources=sources, heldout=HeldoutSpec(sequences=1, length=held_length, queries=8, source="pydoc"))
    return recipe.scaled(tokens)


def _check(out, codes: int, num_layers: int) -> dict:
    config = read_config(out)
    codebooks, factors = read_codebooks(out, config)
    assert config.codebook_size == codes and len(codebooks) == num_layers
    assert all(torch.isfinite(c).all() for c in [*codebooks.values(), *factors.values()])
    report = json.loads((out / "report.json").read_text())
    for row in report["layers"]:
        assert all(0.0 < row[m] <= 1.0 + 1e-6 for m in report["methods"])
    # the oracle picks by the true logits: nothing that scores approximately may beat it by a margin
    for m in report["methods"]:
        assert report["mean"][m] <= report["mean"]["oracle"] + 0.02
    return report


def test_tiny_calibrate_then_convert(tmp_path, tokenizer):
    model = build_tiny_model("llama")
    calib = calibrate(tmp_path / "calib", recipe=_recipe(1200, 512), allow_few_tokens=True,
                      loaded=(model, tokenizer))
    out = convert(calib.path, tmp_path / "ckpt", codes=64, iters=5, loaded=(model, tokenizer))
    _check(out, 64, 2)


@pytest.mark.slow
def test_embedded_calibrate_then_convert(tmp_path, embedded_model, tokenizer):
    calib = calibrate(tmp_path / "calib", recipe=_recipe(2048, 1024), allow_few_tokens=True,
                      loaded=(embedded_model, tokenizer))
    out = convert(calib.path, tmp_path / "ckpt", codes=128, iters=4, loaded=(embedded_model, tokenizer))
    report = _check(out, 128, 30)
    saved = json.loads((out / "config.json").read_text())  # the GGUF model, saved dequantized
    assert saved["quantization_config"]["quant_method"] == "a2ats" and (out / "model.safetensors").is_file()
    assert report["mean"]["oracle"] > 0.5
