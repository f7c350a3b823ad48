"""a2ats bench: timing harness and the command end to end on a tiny checkpoint."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from a2ats_tools.bench.decode import Contender, Timing, bench_point
from a2ats_tools.bench.memory import cache_device_bytes
from a2ats_tools.bench.prefill import real_prefill
from a2ats_tools.bench.profile import G_LINEAR
from a2ats_tools.bench.synthetic import synthetic_prefill, tile_cache
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
    res = bench_point(model, contenders, real_prefill(model, ids), Timing(3, 2), floor=real_prefill(model, ids[:, :8]))
    assert res["context"] == 48 and res["batch"] == 2 and res["cache"] == "real"
    dense = res["contenders"]["dense"]
    assert dense["step_latency_s"]["min"] <= dense["step_latency_s"]["median"] <= dense["step_latency_s"]["max"]
    # measured right after prefill: batch * layers * (K, V) * KV heads * tokens * head_dim * fp32 bytes
    assert dense["kv_device_bytes"] == 2 * 2 * 2 * 2 * 48 * 16 * 4
    again = res["contenders"]["again"]
    assert "speedup_vs_dense" in again and again["kv_device_bytes"] == dense["kv_device_bytes"]
    assert again["prefill_s"] >= dense["prefill_s"] and dense["cache_fill_s"] == 0.0  # the prefill is shared
    assert res["floor"]["context"] == 8 and "speedup_vs_dense" not in res["floor"]
    floor_step = res["floor"]["step_latency_s"]
    for c in (dense, again):  # per block pair: a ratio lies between the extreme blocks' ratios
        assert c["step_latency_s"]["min"] / floor_step["max"] <= c["vs_floor"]["median"]
        assert c["vs_floor"]["median"] <= c["step_latency_s"]["max"] / floor_step["min"]
    with pytest.raises(ValueError, match="dense reference"):
        bench_point(model, contenders[::-1], real_prefill(model, ids), Timing(1, 1))


def test_bench_point_times_generate_and_profiles():
    from transformers import DynamicCache

    model = build_tiny_model("llama")
    ids = torch.randint(100, 1000, (1, 40), generator=torch.Generator().manual_seed(0))
    import copy

    contenders = [Contender("dense", lambda: None, DynamicCache),
                  Contender("again", lambda: None, DynamicCache, from_prefix=copy.deepcopy)]
    timing = Timing(3, 2, generate=True, profile=True)
    res = bench_point(model, contenders, real_prefill(model, ids), timing, floor=real_prefill(model, ids[:, :8]))
    gen = res["contenders"]["again"]["generate"]
    assert set(gen) == {"step_latency_s", "speedup_vs_dense", "vs_floor"} and gen["step_latency_s"]["min"] > 0
    assert "generate" in res["floor"]
    prof = res["contenders"]["dense"]["profile"]
    assert prof["groups"][G_LINEAR] > 0 and prof["wall_s_per_step"] > 0
    assert sum(prof["groups"].values()) == pytest.approx(prof["wall_s_per_step"], rel=0.05)


def _pre_rope_keys(model, ids):
    """Each layer's pre-RoPE keys ``[B, Hkv, n, d]`` of ``ids``, read off the attention modules' own k_proj."""
    from a2ats_tools.models import attention_modules, geometry

    geo = geometry(model)
    keys, handles = {}, []
    for attn in attention_modules(model):
        def hook(module, args, out, i=attn.layer_idx):
            keys[i] = out.view(out.shape[0], out.shape[1], geo.num_kv_heads, geo.head_dim).transpose(1, 2)
        handles.append(attn.k_proj.register_forward_hook(hook))
    with torch.no_grad():
        model(input_ids=ids)
    for h in handles:
        h.remove()
    return keys


def test_synthetic_cache_of_the_source_length_is_the_real_cache():
    model = build_tiny_model("llama")
    ids = torch.randint(100, 1000, (2, 40), generator=torch.Generator().manual_seed(0))
    real = real_prefill(model, ids).cache
    same = tile_cache(model, real, 40)
    for a, b in zip(real.layers, same.layers, strict=True):
        assert torch.allclose(a.keys, b.keys, atol=1e-5) and torch.equal(a.values, b.values)


@pytest.mark.parametrize("family", ["llama", "glm4"])  # GLM-4: partial rotary, adjacent pairs
def test_synthetic_cache_rotates_tiled_keys_to_their_new_positions(family):
    """A cache of 2n tokens from a prefill of n: rows < n are the source's; row p >= n holds source row p - n's
    pre-RoPE key rotated to p by the model's own rotary embedding and its own way of applying it."""
    import importlib

    from .test_families import build

    model = build_tiny_model("llama") if family == "llama" else build(family)
    apply_rotary_pos_emb = importlib.import_module(type(model).__module__).apply_rotary_pos_emb
    n = 24
    ids = torch.randint(100, 1000, (1, n), generator=torch.Generator().manual_seed(1))
    start = synthetic_prefill(model, ids, 2 * n)
    assert start.kind == "synthetic(from 24)" and start.context == 2 * n and start.cache.get_seq_length() == 2 * n
    assert torch.equal(start.ids[:, n:], ids)
    source = real_prefill(model, ids).cache
    pre = _pre_rope_keys(model, ids)
    positions = torch.arange(n, 2 * n)[None]
    with torch.no_grad():
        cos, sin = model.model.rotary_emb(pre[0], positions)
    for i, layer in enumerate(start.cache.layers):
        assert torch.allclose(layer.keys[:, :, :n], source.layers[i].keys, atol=1e-5)
        _, expected = apply_rotary_pos_emb(pre[i], pre[i], cos, sin)
        assert torch.allclose(layer.keys[:, :, n:], expected, atol=1e-4)
        assert torch.equal(layer.values[:, :, n:], source.layers[i].values)


def test_synthetic_cache_of_a_hybrid_model_keeps_the_windows():
    """Gemma 3 (sliding layers with their own rotary base): at the source length the synthetic cache decodes
    exactly like the real one; longer, a sliding layer keeps its window, counted to the new length."""
    from .test_families import WINDOW, build

    model = build("gemma3")
    ids = torch.randint(100, 1000, (1, 3 * WINDOW), generator=torch.Generator().manual_seed(2))
    real = real_prefill(model, ids)
    synthetic = tile_cache(model, real_prefill(model, ids).cache, ids.shape[1])
    step = dict(input_ids=real.first, use_cache=True, cache_position=torch.tensor([ids.shape[1]]))
    with torch.no_grad():
        want = model(**step, **cache_kwargs(real.cache)).logits
        got = model(**step, **cache_kwargs(synthetic)).logits
    assert torch.allclose(want, got, atol=1e-4)
    longer = tile_cache(model, real_prefill(model, ids).cache, 4 * ids.shape[1])
    sliding = [layer for layer in longer.layers if layer.is_sliding]
    assert sliding and all(layer.get_seq_length() == 4 * ids.shape[1] for layer in longer.layers)
    assert all(layer.keys.shape[-2] == WINDOW - 1 for layer in sliding)


def test_cache_kinds_and_the_grid():
    from a2ats_tools.bench.grid import CacheKind, parse_cache_kinds, plan_points

    kinds = parse_cache_kinds("real:8k,synthetic:4k")
    assert kinds == [CacheKind("real", 8192), CacheKind("synthetic", 4096)]
    with pytest.raises(A2atsError, match="--cache"):
        parse_cache_kinds("synthetic")
    model = build_tiny_model("llama")  # 4096 positions
    points, notes = plan_points(model, [1024, 8192, 16384], [1, 4], kinds, decode_tokens=10, caches=2,
                                element_size=4, memory_limit=None)
    assert [(p.context, p.batch, str(p.cache)) for p in points] == [
        (1024, 1, "real:8192"), (1024, 4, "real:8192"), (8192, 1, "real:8192"), (8192, 1, "synthetic:4096"),
        (8192, 4, "real:8192"), (8192, 4, "synthetic:4096"), (16384, 1, "synthetic:4096"),
        (16384, 4, "synthetic:4096")]
    assert any("pass the model's 4096 positions: timed anyway" in n and "8192, 16384" in n for n in notes)
    # 2 layers * 2 (K, V) * 2 KV heads * 16 dims * 4 bytes = 512 bytes a token per batch row, times 2 caches
    points, notes = plan_points(model, [1024, 4096], [1, 4], [CacheKind("real")], decode_tokens=0, caches=2,
                                element_size=4, memory_limit=(4096 * 4 * 1024 - 1) / 2**30)
    assert [(p.context, p.batch) for p in points] == [(1024, 1), (1024, 4), (4096, 1)]
    assert any("--memory-limit" in n and "4096×4" in n for n in notes)
    with pytest.raises(A2atsError, match="covers"):
        plan_points(model, [1024], [1], [CacheKind("synthetic", 4096)], decode_tokens=0, caches=2, element_size=4,
                    memory_limit=None)


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
    from a2ats_tools.artifacts.checkpoint import read_config

    assert data["model"] == read_config(tiny_checkpoint).model_name() != ""
    c = data["points"][0]["contenders"]
    assert list(c) == ["dense", "a2ats", "a2ats[offload=cpu]", "a2ats[score_dtype=bfloat16,rerank=2]"]
    assert c["a2ats"]["speedup_vs_dense"]["median"] > 0
    assert c["a2ats[offload=cpu]"]["kv_device_bytes"] < c["a2ats"]["kv_device_bytes"]  # K/V moved to the host side
    # 64 tokens fit the budget: each step attends to the whole store, and appends one row per layer
    assert c["dense"]["kv_read_bytes_per_step"] is None
    assert c["a2ats"]["kv_read_bytes_per_step"] > 64 * c["a2ats"]["kv_write_bytes_per_step"] > 0
    assert data["runtime"]["rerank"] == 1.5 and data["runtime"]["offload"] is None  # the runtime options set a2ats
    assert (out / "throughput.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "latency.png").read_bytes()[:4] == b"\x89PNG"
    assert data["points"][0]["cache"] == "real" and data["points"][0]["floor"]["context"] == 512
    from a2ats_tools.kernels import cpu_decode

    ran = "fused CPU kernel" if cpu_decode.available() else "torch path"
    assert any(note.startswith(f"A²ATS decode steps ran the {ran}") for note in data["notes"])
    bad = CliRunner().invoke(app, ["bench", str(tiny_checkpoint), "--out", str(tmp_path / "b"), "--contexts", "x"])
    assert isinstance(bad.exception, A2atsError)
    bad = CliRunner().invoke(app, ["bench", str(tiny_checkpoint), "--out", str(tmp_path / "c"), "--also", "score_dtype=fp8"])
    assert isinstance(bad.exception, A2atsError) and "score_dtype" in str(bad.exception)
    assert not (tmp_path / "c").exists()  # the output directory is created only once every option checked out



def test_bench_command_long_contexts_synthetic_caches(tiny_checkpoint, tmp_path):  # noqa: F811
    """Past the tiny model's 4096 positions with a synthetic cache: timed with a note; the points, their cache
    labels, the floor and the RSS are in bench.json, and latency.png is written."""
    from a2ats_tools.cli import app

    out = tmp_path / "bench"
    result = CliRunner().invoke(app, ["bench", str(tiny_checkpoint), "--out", str(out), "--contexts", "64,5k",
                                      "--batches", "1", "--steps", "2", "--repeats", "1", "--floor", "32",
                                      "--cache", "real:64,synthetic:48", "--generate", "--quiet"])
    assert result.exit_code == 0, result.output
    data = json.loads((out / "bench.json").read_text())
    assert data["schema"] == "a2ats.bench" and data["schema_version"] == 2
    assert data["settings"]["cache"] == ["real:64", "synthetic:48"] and data["contenders"] == ["dense", "a2ats"]
    assert [(p["context"], p["cache"]) for p in data["points"]] == [
        (64, "real"), (64, "synthetic(from 48)"), (5120, "synthetic(from 48)")]
    for p in data["points"]:
        assert p["floor"]["context"] == 32 and p["rss"]["peak_bytes"] > 0 and p["rss"]["scope"] in ("point", "process")
        a2ats = p["contenders"]["a2ats"]
        assert a2ats["vs_floor"]["median"] > 0 and a2ats["generate"]["vs_floor"]["median"] > 0
        assert (a2ats["cache_fill_share"] is not None) == (p["cache"] == "real")
    assert any("pass the model's 4096 positions: timed anyway" in n for n in data["notes"])
    assert (out / "latency.png").read_bytes()[:4] == b"\x89PNG"


def test_parse_overrides_keeps_commas_inside_values():
    from a2ats_tools.runtime.settings import parse_overrides

    assert parse_overrides("dense_layers=0,1,budget=5%,rerank=2") == {"dense_layers": "0,1", "budget": "5%", "rerank": 2}
    assert parse_overrides("score_dtype=bfloat16") == {"score_dtype": "bfloat16"}
    with pytest.raises(A2atsError):
        parse_overrides("bfloat16")
