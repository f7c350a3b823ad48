"""Calibration capture and statistics on tiny random models: pre-RoPE keys, query moments, chunked prefill."""

from __future__ import annotations

import pytest
import torch

from a2ats_tools.calibration.accumulate import StatsAccumulator
from a2ats_tools.calibration.capture import capturing
from a2ats_tools.calibration.format import CalibrationSet
from a2ats_tools.calibration.run import heldout_query_positions, parse_positions, run_document
from a2ats_tools.compat import cache_kwargs
from a2ats_tools.errors import A2atsError
from a2ats_tools.models import attention_modules, geometry, rotary
from a2ats_tools.rope import DistanceBuckets, apply_rope

from .conftest import TINY_ARCHS, build_tiny_model


def _capture(model, ids: list[int], chunk: int, directory) -> StatsAccumulator:
    acc = StatsAccumulator(directory, geometry(model), shard_tokens=5)  # tiny shards: exercises the merge
    with capturing(model, acc.training_sink):
        run_document(model, ids, chunk, torch.device("cpu"))
    return acc


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_stored_keys_are_pre_rope(arch, tmp_path):
    """At layer 0 a key depends only on its token: the same token at different positions stores one key."""
    model = build_tiny_model(arch)
    token = 1234
    ids = [token, 17, 99, 5000, token, 321, 42, 7, 8, 9, 10, 11, token]
    acc = _capture(model, ids, chunk=4, directory=tmp_path)
    acc.finish(rotary(model), [2048])
    stored = _read_keys(tmp_path, 0)
    assert stored.dtype == torch.float16 and stored.shape == (2, len(ids), 16)
    for pos in (4, 12):
        torch.testing.assert_close(stored[:, pos].float(), stored[:, 0].float(), atol=2e-3, rtol=2e-3)
    # the rotated (post-RoPE) keys of the same token differ: the check above is not vacuous
    cos, sin = rotary(model).cos_sin(torch.tensor([0, 12]))
    rotated = apply_rope(stored[:, [0, 12]].float(), cos, sin)
    assert (rotated[:, 0] - rotated[:, 1]).abs().max() > 1e-2


def _read_keys(directory, layer: int) -> torch.Tensor:
    from safetensors import safe_open

    with safe_open(str(directory / f"layer_{layer:03d}.safetensors"), framework="pt") as f:
        return f.get_tensor("keys")


def _brute_force_queries(model, ids: list[int]) -> dict[int, torch.Tensor]:
    """Pre-RoPE queries [Hq, T, d] per layer from independent hooks on q_norm (when present) or q_proj."""
    geo = geometry(model)
    found: dict[int, torch.Tensor] = {}
    handles = []
    for attn in attention_modules(model):
        target = getattr(attn, "q_norm", None) or attn.q_proj

        def hook(_m, _inp, out, layer=attn.layer_idx):
            found[layer] = out.reshape(out.shape[0], out.shape[1], geo.num_heads, geo.head_dim)[0].transpose(0, 1)

        handles.append(target.register_forward_hook(hook))
    with torch.no_grad():
        model(torch.tensor([ids]))
    for h in handles:
        h.remove()
    return found


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_query_moments_match_brute_force(arch, tmp_path):
    model = build_tiny_model(arch, seed=1)
    geo = geometry(model)
    ids = torch.randint(0, 5000, (37,), generator=torch.Generator().manual_seed(0)).tolist()
    acc = _capture(model, ids, chunk=10, directory=tmp_path)
    positions = [64, 2048]
    acc.finish(rotary(model), positions)
    from safetensors import safe_open

    from a2ats_tools.calibration import format as fmt

    queries = _brute_force_queries(model, ids)
    rot = rotary(model)
    for layer in range(geo.num_layers):
        with safe_open(str(tmp_path / fmt.layer_file(layer)), framework="pt") as f:
            moment, wrope, count = (f.get_tensor(n) for n in ("query_moment", "wrope_query_moment", "query_count"))
        q = queries[layer].double()  # [Hq, T, d]
        assert count.tolist() == [geo.group_size * len(ids)] * geo.num_kv_heads
        for h in range(geo.num_kv_heads):
            group = q[h * geo.group_size : (h + 1) * geo.group_size].reshape(-1, geo.head_dim)
            torch.testing.assert_close(moment[h], group.T @ group, rtol=1e-4, atol=1e-3)
            for p, r in enumerate(positions):
                cos, sin = rot.cos_sin(torch.tensor([r]))
                qw = apply_rope(group.float(), cos[0], sin[0]).double()  # rotate each query to distance r
                torch.testing.assert_close(wrope[p, h], qw.T @ qw, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_chunked_prefill_equals_unchunked(arch, tmp_path):
    model = build_tiny_model(arch, seed=2)
    ids = torch.randint(0, 5000, (45,), generator=torch.Generator().manual_seed(1)).tolist()
    with torch.no_grad():
        reference_logits = model(torch.tensor([ids])).logits[0, -1]
    one = _capture(model, ids, chunk=1000, directory=tmp_path / "one")
    many = _capture(model, ids, chunk=7, directory=tmp_path / "many")
    torch.testing.assert_close(one.query_moment, many.query_moment, rtol=1e-4, atol=1e-3)
    one.finish(rotary(model), [2048])
    many.finish(rotary(model), [2048])
    for layer in range(2):
        torch.testing.assert_close(_read_keys(tmp_path / "one", layer), _read_keys(tmp_path / "many", layer), atol=2e-3, rtol=2e-3)
    # the capturing attention computes attention exactly, also across chunks through the cache
    from transformers import DynamicCache

    with capturing(model, lambda *_: None), torch.no_grad():
        cache = DynamicCache(config=model.config)
        for start in range(0, len(ids), 7):
            logits = model(torch.tensor([ids[start : start + 7]]), **cache_kwargs(cache), use_cache=True).logits
    torch.testing.assert_close(logits[0, -1], reference_logits, rtol=1e-4, atol=1e-4)
    assert model.config._attn_implementation == "sdpa"  # restored after capture


def test_captured_nan_is_a_clear_error(tmp_path):
    from a2ats_tools.errors import CapturedStateError

    model = build_tiny_model("llama")
    with torch.no_grad():
        attention_modules(model)[1].k_proj.weight[0, 0] = float("nan")
    with pytest.raises(CapturedStateError, match="layer 1"):
        _capture(model, [1, 2, 3, 4], chunk=4, directory=tmp_path)


def test_parse_positions():
    assert parse_positions("2048", 8192) == [2048]
    assert parse_positions("4096, 2048,2048", 8192) == [2048, 4096]
    log = list(DistanceBuckets.log_spaced(8192).centres)
    assert parse_positions("log", 8192) == log
    assert parse_positions("2048,log", 8192) == sorted(set(log) | {2048})
    with pytest.raises(A2atsError):
        parse_positions("far", 8192)
    with pytest.raises(A2atsError):
        parse_positions(" , ", 8192)


def test_heldout_query_positions_spread_over_last_three_quarters():
    pos = heldout_query_positions(4096, 64)
    assert pos.numel() == 64 and pos.min() >= 1024 and pos.max() == 4095
    assert torch.all(pos[1:] > pos[:-1])


def test_calibration_set_refuses_missing_dir(tmp_path):
    with pytest.raises(A2atsError, match="does not exist"):
        CalibrationSet(tmp_path / "nope")


def test_heldout_capture_keeps_all_keys_and_the_chosen_queries(tmp_path):
    model = build_tiny_model("qwen2", seed=3)
    ids = torch.randint(0, 5000, (40,), generator=torch.Generator().manual_seed(2)).tolist()
    acc = StatsAccumulator(tmp_path, geometry(model))
    positions = heldout_query_positions(len(ids), 6)
    with capturing(model, acc.heldout_sink):
        acc.begin_heldout(positions)
        run_document(model, ids, 7, torch.device("cpu"))  # chosen positions fall in several chunks
        acc.end_heldout()
    acc.finish(rotary(model), [2048])
    stats = CalibrationSet.__new__(CalibrationSet)
    stats.path = tmp_path
    held = stats.layer(1)
    queries = _brute_force_queries(model, ids)[1]
    assert held.heldout_query_positions.tolist() == [positions.tolist()]
    torch.testing.assert_close(held.heldout_queries[0], queries[:, positions], rtol=1e-4, atol=1e-4)
    assert held.heldout_keys.shape == (1, 2, 40, 16) and held.keys.shape == (2, 0, 16)
    assert held.query_count.tolist() == [0, 0]  # held-out tokens never enter the training statistics
