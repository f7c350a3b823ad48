"""a2ats bench: timing harness and the command end to end on a tiny checkpoint."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from a2ats_tools.bench.decode import Contender, bench_point
from a2ats_tools.bench.memory import cache_device_bytes
from a2ats_tools.compat import cache_kwargs
from a2ats_tools.errors import A2atsError

from .conftest import build_tiny_model
from .test_eval import tiny_checkpoint  # noqa: F401  (fixture)


def test_bench_point_on_dense_contenders():
    from transformers import DynamicCache

    model = build_tiny_model("mistral")
    ids = torch.randint(100, 1000, (2, 48), generator=torch.Generator().manual_seed(0))
    import copy

    contenders = [Contender("dense", lambda: None, DynamicCache),
                  Contender("again", lambda: None, DynamicCache, from_prefix=copy.deepcopy)]
    res = bench_point(model, contenders, ids, steps=3, repeats=2)
    assert res["context"] == 48 and res["batch"] == 2
    dense = res["contenders"]["dense"]
    assert dense["step_latency_s"]["min"] <= dense["step_latency_s"]["median"] <= dense["step_latency_s"]["max"]
    # measured right after prefill: batch * layers * (K, V) * KV heads * tokens * head_dim * fp32 bytes
    assert dense["kv_device_bytes"] == 2 * 2 * 2 * 2 * 48 * 16 * 4
    again = res["contenders"]["again"]
    assert "speedup_vs_dense" in again and again["kv_device_bytes"] == dense["kv_device_bytes"]
    assert again["prefill_s"] >= dense["prefill_s"] and dense["cache_fill_s"] == 0.0  # the prefill is shared
    with pytest.raises(ValueError, match="dense reference"):
        bench_point(model, contenders[::-1], ids, steps=1, repeats=1)


def test_cache_device_bytes_of_dynamic_cache():
    from transformers import DynamicCache

    model = build_tiny_model("llama")
    cache = DynamicCache()
    with torch.no_grad():
        model(input_ids=torch.tensor([[5, 6, 7]]), **cache_kwargs(cache), use_cache=True)
    assert cache_device_bytes(cache, torch.device("cpu")) == 2 * 2 * 2 * 3 * 16 * 4


def test_bench_command_end_to_end(tiny_checkpoint, tmp_path):  # noqa: F811
    from a2ats_tools.cli import app

    out = tmp_path / "bench"
    result = CliRunner().invoke(app, ["bench", str(tiny_checkpoint), "--out", str(out), "--contexts", "64",
                                      "--batches", "1,2", "--steps", "2", "--repeats", "2", "--also", "offload=cpu", "--quiet",
                                      "--also", "score_dtype=bfloat16,rerank=2", "--rerank", "1.5"])
    assert result.exit_code == 0, result.output
    data = json.loads((out / "bench.json").read_text())
    assert [(p["context"], p["batch"]) for p in data["points"]] == [(64, 1), (64, 2)]
    c = data["points"][0]["contenders"]
    assert list(c) == ["dense", "a2ats", "a2ats[offload=cpu]", "a2ats[score_dtype=bfloat16,rerank=2]"]
    assert c["a2ats"]["speedup_vs_dense"]["median"] > 0
    assert c["a2ats[offload=cpu]"]["kv_device_bytes"] < c["a2ats"]["kv_device_bytes"]  # K/V moved to the host side
    assert data["runtime"]["rerank"] == 1.5 and data["runtime"]["offload"] is None  # the runtime options set a2ats
    assert (out / "throughput.png").read_bytes()[:4] == b"\x89PNG"
    from a2ats_tools.kernels import cpu_decode

    ran = "fused CPU kernel" if cpu_decode.available() else "torch path"
    assert any(note.startswith(f"A²ATS decode steps ran the {ran}") for note in data["notes"])
    bad = CliRunner().invoke(app, ["bench", str(tiny_checkpoint), "--out", str(tmp_path / "b"), "--contexts", "x"])
    assert isinstance(bad.exception, A2atsError)
    bad = CliRunner().invoke(app, ["bench", str(tiny_checkpoint), "--out", str(tmp_path / "c"), "--also", "score_dtype=fp8"])
    assert isinstance(bad.exception, A2atsError) and "score_dtype" in str(bad.exception)
    assert not (tmp_path / "c").exists()  # the output directory is created only once every option checked out


def test_parse_overrides_keeps_commas_inside_values():
    from a2ats_tools.runtime.settings import parse_overrides

    assert parse_overrides("dense_layers=0,1,budget=5%,rerank=2") == {"dense_layers": "0,1", "budget": "5%", "rerank": 2}
    assert parse_overrides("score_dtype=bfloat16") == {"score_dtype": "bfloat16"}
    with pytest.raises(A2atsError):
        parse_overrides("bfloat16")
