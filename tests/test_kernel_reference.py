"""The kernels' torch references (the runtime's CPU path) against brute-force definitions."""

from __future__ import annotations

import math

import pytest
import torch

from a2ats_tools.kernels import (
    build_tables_torch,
    encode_torch,
    prepare_codebook,
    score_torch,
    select_topk,
    sparse_decode_torch,
)
from a2ats_tools.rope import DistanceBuckets
from a2ats_tools.scoring import SelectionPolicy, forced_mask, select


def random_whitening(hkv: int, d: int, gen: torch.Generator) -> torch.Tensor:
    a = torch.randn(hkv, d, d, generator=gen)
    return torch.linalg.cholesky(torch.eye(d) + 0.3 * a @ a.transpose(1, 2))


@pytest.mark.parametrize("chunk", [7, 4096])
def test_encode_is_whitened_nearest_centroid(chunk):
    gen = torch.Generator().manual_seed(0)
    b, hkv, n, d, c = 2, 3, 50, 16, 37
    codebook = torch.randn(hkv, c, d, generator=gen)
    whitening = random_whitening(hkv, d, gen)
    keys = torch.randn(b, hkv, n, d, generator=gen).to(torch.bfloat16)
    codes = encode_torch(keys, prepare_codebook(codebook, whitening), chunk=chunk)
    assert codes.shape == (b, hkv, n) and codes.dtype == torch.int16
    dist = torch.cdist(keys.float() @ whitening, (codebook @ whitening).unsqueeze(0))  # [B,Hkv,N,C]
    assert torch.equal(codes.long(), dist.argmin(-1))


def test_encode_uses_int32_codes_beyond_int16():
    gen = torch.Generator().manual_seed(1)
    codebook = torch.randn(1, 40000, 4, generator=gen)
    tables = prepare_codebook(codebook, torch.eye(4).unsqueeze(0))
    keys = codebook[:, [39999, 5, 33000]].unsqueeze(0)  # each key is a centroid
    codes = encode_torch(keys, tables)
    assert codes.dtype == torch.int32 and codes.tolist() == [[[39999, 5, 33000]]]


@pytest.mark.parametrize("length", [1, 63, 64, 65, 200, 8192])
@pytest.mark.parametrize("ratio", [2.0, math.sqrt(2)])
def test_row_buckets_follow_the_bucket_edges(length, ratio):
    buckets = DistanceBuckets.log_spaced(8192, start=64, ratio=ratio)
    got = buckets.row_buckets(length)
    edges = buckets.edges
    for j in range(length):  # brute force: the last bucket whose lower edge is at most the distance (to 1e-9)
        dist = length - 1 - j
        want = max([b for b, e in enumerate(edges) if e * (1 - 1e-9) <= dist], default=0)
        assert int(got[j]) == want
    assert torch.equal(DistanceBuckets.single(2048).row_buckets(length), torch.zeros(length, dtype=torch.long))


def test_bucket_of_honours_stored_edges_that_are_not_geometric():
    buckets = DistanceBuckets.from_config({"mode": "log", "centres": [80, 300, 2000], "edges": [64.0, 128.0, 1000.0]})
    dist = torch.tensor([0, 63, 64, 127, 128, 500, 999, 1000, 5000])
    assert buckets.bucket_of(dist).tolist() == [0, 0, 0, 0, 1, 1, 1, 2, 2]


@pytest.mark.parametrize("aggregation", ["sum", "max"])
@pytest.mark.parametrize("g,p", [(1, 1), (3, 3)])
def test_score_matches_python_double_loop(aggregation, g, p):
    gen = torch.Generator().manual_seed(2)
    b, hkv, d, c, nmax, length = 2, 2, 8, 11, 40, 33
    n_sink, window = 2, 4
    q = torch.randn(b, hkv * g, d, generator=gen)
    codebook = torch.randn(hkv, c, d, generator=gen)
    rotations = torch.randn(p, d, d, generator=gen)
    codes = torch.randint(0, c, (b, hkv, nmax), generator=gen, dtype=torch.int16)
    first_valid = torch.tensor([0, 5])
    tables = build_tables_torch(q, codebook, rotations, aggregation)
    assert tables.shape == (b, hkv, 1 if aggregation == "sum" else g, p, c)
    buckets = DistanceBuckets.geometric(p, 4.0, 2.0)
    scores = score_torch(tables, codes, length, first_valid, n_sink, window, buckets, aggregation)
    bucket = buckets.row_buckets(length)
    for bi in range(b):
        valid = torch.arange(length) >= first_valid[bi]
        forced = forced_mask(valid, n_sink, window)
        for h in range(hkv):
            for j in range(length):
                heads = [
                    (q[bi, h * g + gi] @ rotations[bucket[j]]) @ codebook[h, codes[bi, h, j]]
                    for gi in range(g)
                ]
                want = sum(heads) if aggregation == "sum" else max(heads)
                got = scores[bi, h, j].item()
                if not valid[j]:
                    assert got == -math.inf
                elif forced[j]:
                    assert got == math.inf
                else:
                    assert got == pytest.approx(want.item(), rel=1e-4, abs=1e-4)


def test_select_topk_matches_scoring_select():
    gen = torch.Generator().manual_seed(3)
    b, hkv, length, n_sink, window = 2, 3, 300, 8, 64
    first_valid = torch.tensor([0, 200])
    raw = torch.randn(b, hkv, length, generator=gen)
    tables = raw.unsqueeze(2).unsqueeze(3)  # G'=1, P=1, C=length: code j scores raw[j]
    codes = torch.arange(length, dtype=torch.int16).expand(b, hkv, length)
    scores = score_torch(tables, codes, length, first_valid, n_sink, window, DistanceBuckets.single(), "sum")
    policy = SelectionPolicy(n_sink=n_sink, window=window, budget=20)
    for bi in range(b):
        valid = torch.arange(length) >= first_valid[bi]
        k = n_sink + window + 20
        idx, keep = select_topk(scores[bi : bi + 1], k)
        ref_idx, ref_keep = select(raw[bi], valid, policy)
        assert set(idx[0][keep[0]].view(-1).tolist()) == set(ref_idx[ref_keep].view(-1).tolist())
        chosen = torch.zeros(hkv, length, dtype=torch.bool).scatter_(1, idx[0], keep[0])
        assert chosen.sum(1).tolist() == [min(k, int(valid.sum()))] * hkv


def test_select_topk_clips_k():
    idx, keep = select_topk(torch.randn(1, 2, 5), 9)
    assert idx.shape == (1, 2, 5) and keep.all()


@pytest.mark.parametrize("g", [1, 3])
def test_sparse_decode_matches_masked_dense_softmax(g):
    gen = torch.Generator().manual_seed(4)
    b, hkv, n, d, k = 2, 2, 40, 16, 13
    q = torch.randn(b, hkv * g, d, generator=gen)
    k_cache = torch.randn(b, hkv, n, d, generator=gen)
    v_cache = torch.randn(b, hkv, n, d, generator=gen)
    indices = torch.stack([torch.randperm(n, generator=gen)[:k] for _ in range(b * hkv)]).reshape(b, hkv, k)
    keep = torch.rand(b, hkv, k, generator=gen) > 0.3
    keep[..., 0] = True
    out = sparse_decode_torch(q, k_cache, v_cache, indices, keep, 0.25)
    chosen = torch.zeros(b, hkv, n, dtype=torch.bool).scatter_(2, indices, keep)
    logits = (q.reshape(b, hkv, g, d) @ k_cache.transpose(-1, -2)) * 0.25
    probs = logits.masked_fill(~chosen.unsqueeze(2), -math.inf).softmax(-1)
    want = (probs @ v_cache).reshape(b, hkv * g, d)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


def test_sparse_decode_at_full_selection_equals_dense_sdpa():
    gen = torch.Generator().manual_seed(5)
    b, hkv, g, n, d = 2, 3, 3, 50, 16
    q = torch.randn(b, hkv * g, d, generator=gen).to(torch.bfloat16)
    k_cache = torch.randn(b, hkv, n, d, generator=gen).to(torch.bfloat16)
    v_cache = torch.randn(b, hkv, n, d, generator=gen).to(torch.bfloat16)
    indices = torch.randperm(n, generator=gen).expand(b, hkv, n)
    out = sparse_decode_torch(q, k_cache, v_cache, indices, torch.ones(b, hkv, n, dtype=torch.bool), d**-0.5)
    assert out.dtype == torch.bfloat16
    dense = torch.nn.functional.scaled_dot_product_attention(
        q.float().unsqueeze(2), k_cache.float(), v_cache.float(), enable_gqa=True
    ).squeeze(2)
    torch.testing.assert_close(out.float(), dense, rtol=1e-2, atol=1e-2)


def test_sparse_decode_with_nothing_kept_outputs_zeros():
    q = torch.randn(1, 2, 4)
    cache = torch.randn(1, 1, 6, 4)
    out = sparse_decode_torch(
        q, cache, cache, torch.zeros(1, 1, 3, dtype=torch.long), torch.zeros(1, 1, 3, dtype=torch.bool), 1.0
    )
    assert torch.equal(out, torch.zeros_like(out))


@pytest.mark.parametrize("layout", ["slice", "heads_last", "expanded"])
def test_sparse_decode_on_strided_caches(layout):
    """Preallocated caches are sliced views; others keep tokens outermost; GQA repeats may be expanded."""
    gen = torch.Generator().manual_seed(6)
    b, hkv, g, n, d, k = 2, 2, 2, 30, 8, 11
    q = torch.randn(b, hkv * g, d, generator=gen)
    if layout == "slice":
        k_cache = torch.randn(b, hkv, n + 17, d, generator=gen)[:, :, :n]
    elif layout == "heads_last":
        k_cache = torch.randn(b, n, hkv, d, generator=gen).transpose(1, 2)
    else:
        k_cache = torch.randn(1, hkv, n, d, generator=gen).expand(b, hkv, n, d)
    v_cache = torch.randn(b, hkv, n + 5, d, generator=gen)[:, :, 5:]
    indices = torch.randint(0, n, (b, hkv, k), generator=gen)
    keep = torch.ones(b, hkv, k, dtype=torch.bool)
    got = sparse_decode_torch(q, k_cache, v_cache, indices, keep, 0.3)
    k_sel = k_cache.contiguous().gather(2, indices.unsqueeze(-1).expand(-1, -1, -1, d))
    v_sel = v_cache.contiguous().gather(2, indices.unsqueeze(-1).expand(-1, -1, -1, d))
    probs = ((q.reshape(b, hkv, g, d) @ k_sel.transpose(-1, -2)) * 0.3).softmax(-1)
    torch.testing.assert_close(got, (probs @ v_sel).reshape(b, hkv * g, d), rtol=1e-5, atol=1e-5)
