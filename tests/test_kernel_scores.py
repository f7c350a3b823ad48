"""The score op: ``build_tables`` + ``score_torch`` (the runtime's CPU path) against a per-token brute force, and
the Triton score kernel (under the interpreter) against ``score_torch`` on the same inputs: GQA groups of 1, 2
and 8, sum and max, float32 and bf16 tables, int16 and int32 codes."""

from __future__ import annotations

import pytest
import torch

from a2ats_tools.kernels import build_tables, score, score_torch, score_triton
from a2ats_tools.kernels._dispatch import triton_available
from a2ats_tools.rope import DistanceBuckets
from a2ats_tools.runtime.selectors import A2atsSelector
from a2ats_tools.runtime.settings import RuntimeSettings

from .brute_force import token_score

needs_triton = pytest.mark.skipif(not triton_available(), reason="triton is not installed")


def rotations(p: int, d: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random rotary factors ``[P, d]`` for ``P`` bucket centres (the halves of each pair share an angle)."""
    angles = torch.rand(p, d // 2, generator=gen) * 6.3
    return torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)


def inputs(b, hkv, g, p, c, d, nmax, length, code_dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hkv * g, d, generator=gen)
    codebook = torch.randn(hkv, c, d, generator=gen)
    cos, sin = rotations(p, d, gen)
    codes = torch.randint(0, c, (b, hkv, nmax), generator=gen).to(code_dtype)
    buckets = DistanceBuckets.geometric(p, 4.0, 2.0)
    offsets = buckets.row_buckets(length).long() * c
    return q, codebook, cos, sin, codes, buckets, offsets


@pytest.mark.parametrize("aggregation", ["sum", "max"])
@pytest.mark.parametrize("g,p", [(1, 1), (2, 3), (8, 3)])
def test_score_matches_a_per_token_computation(aggregation, g, p):
    b, hkv, d, c, nmax, length = 2, 2, 8, 11, 40, 33
    q, codebook, cos, sin, codes, buckets, offsets = inputs(b, hkv, g, p, c, d, nmax, length, torch.int16, 2)
    tables = build_tables(q, codebook.transpose(1, 2).contiguous(), cos, sin, aggregation)
    assert tables.shape == (b, hkv, 1 if aggregation == "sum" else g, p * c)
    scores = score_torch(tables, codes, offsets, aggregation)
    bucket = buckets.row_buckets(length)
    for bi in range(b):
        for h in range(hkv):
            for j in range(length):
                want = token_score(q[bi, h * g : (h + 1) * g], codebook[h], int(codes[bi, h, j]), cos[bucket[j]],
                                   sin[bucket[j]], aggregation)
                assert scores[bi, h, j].item() == pytest.approx(want, rel=1e-4, abs=1e-4)


def test_score_tables_in_bf16_keep_their_dtype_and_stay_close():
    q, codebook, cos, sin, codes, _, offsets = inputs(2, 2, 2, 3, 64, 16, 90, 90, torch.int16, 3)
    cb = codebook.transpose(1, 2).contiguous()
    full = score_torch(build_tables(q, cb, cos, sin, "sum"), codes, offsets, "sum")
    half = score_torch(build_tables(q, cb.bfloat16(), cos, sin, "sum", torch.bfloat16), codes, offsets, "sum")
    assert half.dtype == torch.bfloat16
    assert 0 < (half.float() - full).abs().max() <= 0.02 * full.abs().max()


@needs_triton
@pytest.mark.parametrize(
    "b,hkv,g,p,c,nmax,length,aggregation,code_dtype,table_dtype",
    [
        (2, 3, 2, 3, 37, 50, 45, "max", torch.int16, torch.float32),  # G=2, P>1
        (2, 3, 2, 3, 37, 50, 45, "sum", torch.int32, torch.float32),  # sum folds the group: G'=1
        (1, 2, 1, 1, 100, 300, 300, "sum", torch.int16, torch.float32),  # G=1, P=1
        (2, 1, 8, 5, 20, 600, 590, "max", torch.int32, torch.float32),  # G=8, several token blocks
        (2, 2, 8, 4, 64, 200, 180, "sum", torch.int16, torch.bfloat16),  # bf16 tables
    ],
)
def test_score_triton_matches_torch(b, hkv, g, p, c, nmax, length, aggregation, code_dtype, table_dtype):
    q, codebook, cos, sin, codes, _, offsets = inputs(b, hkv, g, p, c, 4, nmax, length, code_dtype, 12)
    tables = build_tables(q, codebook.transpose(1, 2).contiguous().to(table_dtype), cos, sin, aggregation, table_dtype)
    got = score_triton(tables, codes, offsets, aggregation, block=64)
    want = score_torch(tables, codes, offsets, aggregation)
    torch.testing.assert_close(got, want.float(), rtol=1e-6, atol=1e-6)
    assert torch.equal(score(tables, codes, offsets, aggregation, backend="triton"), got)


@needs_triton
@pytest.mark.parametrize(("buckets", "score_dtype"), [("single", "float32"), ("log", "float32"), ("log", "bfloat16")])
def test_selector_scores_match_score_kernel(buckets, score_dtype):
    """The selector's fused (Triton) score gather equals its torch gather, bucket by bucket (bf16 tables too)."""
    from a2ats_tools.models import rotary
    from a2ats_tools.rope import DistanceBuckets
    from a2ats_tools.runtime.cache import LayerState

    from .conftest import build_tiny_model

    g = torch.Generator().manual_seed(2)
    b, hq, hkv, c, d, length = 2, 4, 2, 32, 16, 700
    codebook = torch.randn(hkv, c, d, generator=g)
    settings = RuntimeSettings(buckets=DistanceBuckets.single(2048) if buckets == "single" else DistanceBuckets.log_spaced(1024),
                               score_dtype=score_dtype)
    sel = A2atsSelector(settings, 0, hq, hkv, d, codebook=codebook, whitening=torch.eye(d).expand(hkv, d, d),
                        rotary=rotary(build_tiny_model("llama")))
    state = LayerState()
    state.capacity, state.device = length, torch.device("cpu")
    sel.on_prefill(state, torch.randn(b, hkv, length, d, generator=g), None, 0)
    q = torch.randn(b, hq, d, generator=g)
    ours = sel.scores(state, q, q, length)
    sel.settings = settings.with_overrides(kernels="triton")
    fused = sel.scores(state, q, q, length)
    assert ours.shape == fused.shape == (b, hkv, length)
    torch.testing.assert_close(fused, ours.float(), atol=1e-5, rtol=1e-5)


def test_bfloat16_score_table_stays_close_to_float32():
    """A bf16 table changes scores by bf16 rounding only (same codes, same buckets)."""
    from a2ats_tools.models import rotary
    from a2ats_tools.rope import DistanceBuckets
    from a2ats_tools.runtime.cache import LayerState

    from .conftest import build_tiny_model

    g = torch.Generator().manual_seed(3)
    b, hq, hkv, c, d, length = 2, 4, 2, 64, 16, 500
    codebook, keys = torch.randn(hkv, c, d, generator=g), torch.randn(b, hkv, length, d, generator=g)
    q = torch.randn(b, hq, d, generator=g)
    out = {}
    for dtype in ("float32", "bfloat16"):
        settings = RuntimeSettings(buckets=DistanceBuckets.log_spaced(1024), score_dtype=dtype)
        sel = A2atsSelector(settings, 0, hq, hkv, d, codebook=codebook, whitening=torch.eye(d).expand(hkv, d, d),
                            rotary=rotary(build_tiny_model("llama")))
        state = LayerState()
        state.capacity, state.device = length, torch.device("cpu")
        sel.on_prefill(state, keys, None, 0)
        out[dtype] = sel.scores(state, q, q, length)
    assert out["bfloat16"].dtype == torch.bfloat16
    err = (out["bfloat16"].float() - out["float32"]).abs()
    assert 0 < err.max() <= 0.02 * out["float32"].abs().max()


@pytest.mark.parametrize("native", [True, False])
def test_bfloat16_table_without_native_bf16_matches_the_bf16_product(monkeypatch, native):
    """On a CPU without bf16 instructions the bf16 table is a float32 product of bf16-rounded operands (a native
    bf16 product there is ~100x slower); either way the table equals torch's own bf16 product."""
    from a2ats_tools.models import rotary
    from a2ats_tools.rope import DistanceBuckets, apply_rope
    from a2ats_tools.runtime.selectors import a2ats as selectors

    from .conftest import build_tiny_model

    monkeypatch.setattr(selectors, "cpu_has_native_bf16", lambda: native)
    g = torch.Generator().manual_seed(4)
    b, hq, hkv, c, d = 3, 4, 2, 64, 16
    codebook = torch.randn(hkv, c, d, generator=g)
    settings = RuntimeSettings(buckets=DistanceBuckets.log_spaced(1024), score_dtype="bfloat16")
    sel = A2atsSelector(settings, 0, hq, hkv, d, codebook=codebook, whitening=torch.eye(d).expand(hkv, d, d),
                        rotary=rotary(build_tiny_model("llama")))
    q = torch.randn(b, hq, d, generator=g)
    used = sel.buckets.count
    table = sel.tables(q, used)
    assert table.dtype == torch.bfloat16 and table.shape == (b, hkv, 1, used * c)
    folded = q.reshape(b, hkv, hq // hkv, d).sum(2, keepdim=True)
    rows = apply_rope(folded.unsqueeze(3), sel.cos[:used], sel.sin[:used])  # [B, Hkv, 1, P, d]
    reference = torch.einsum("bhgpd,hcd->bhgpc", rows.bfloat16(), codebook.bfloat16())
    # the same rounded operands and float32 accumulation: equal up to one bf16 rounding of the output
    torch.testing.assert_close(table.float(), reference.reshape(b, hkv, 1, used * c).float(), atol=1e-2, rtol=2**-7)
