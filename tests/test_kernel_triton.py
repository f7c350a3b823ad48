"""Each Triton kernel under the CPU interpreter (``TRITON_INTERPRET=1``, set by conftest) vs its torch reference."""

from __future__ import annotations

import pytest
import torch

from a2ats_tools.kernels import (
    build_tables_torch,
    encode,
    encode_torch,
    encode_triton,
    prepare_codebook,
    score_select,
    score_torch,
    score_triton,
    select_topk,
    sparse_decode,
    sparse_decode_torch,
    sparse_decode_triton,
)
from a2ats_tools.kernels._dispatch import resolve_backend, triton_available
from a2ats_tools.rope import DistanceBuckets

pytestmark = pytest.mark.skipif(not triton_available(), reason="triton is not installed")


def random_whitening(hkv: int, d: int, gen: torch.Generator) -> torch.Tensor:
    a = torch.randn(hkv, d, d, generator=gen)
    return torch.linalg.cholesky(torch.eye(d) + 0.3 * a @ a.transpose(1, 2))


@pytest.mark.parametrize(
    "b,hkv,n,d,c,dtype",
    [
        (2, 3, 50, 16, 37, torch.float16),  # C not a power of two, N not a block multiple
        (1, 2, 17, 8, 100, torch.float32),  # head dim below the 16 tl.dot minimum (padded)
        (2, 1, 5, 64, 300, torch.bfloat16),  # several codebook tiles
        (1, 1, 1, 16, 16, torch.float32),  # one decode-step key
        (1, 2, 9, 80, 50, torch.float32),  # head dim above 64: keys whitened before the kernel
    ],
)
def test_encode_triton_matches_torch(b, hkv, n, d, c, dtype):
    gen = torch.Generator().manual_seed(10)
    tables = prepare_codebook(torch.randn(hkv, c, d, generator=gen), random_whitening(hkv, d, gen))
    keys = torch.randn(b, hkv, n, d, generator=gen).to(dtype)
    got = encode_triton(keys, tables, block_n=16, block_c=32 if d <= 64 else None)
    assert got.dtype == torch.int16
    assert torch.equal(got, encode_torch(keys, tables))


def test_encode_triton_int32_codes_and_strided_keys():
    gen = torch.Generator().manual_seed(11)
    codebook = torch.randn(1, 32800, 16, generator=gen)
    tables = prepare_codebook(codebook, torch.eye(16).unsqueeze(0))
    chosen = [32799, 3, 32768, 12345]
    keys = codebook[:, chosen].unsqueeze(0).transpose(1, 2).contiguous().transpose(1, 2)  # non-contiguous
    got = encode_triton(keys, tables, block_n=16, block_c=4096)
    assert got.dtype == torch.int32 and got.tolist() == [[chosen]]


@pytest.mark.parametrize(
    "b,hkv,g,p,c,nmax,length,aggregation,code_dtype",
    [
        (2, 3, 3, 3, 37, 50, 45, "max", torch.int16),  # G>1, P>1
        (2, 3, 3, 3, 37, 50, 45, "sum", torch.int32),  # sum folds the group: G'=1
        (1, 2, 1, 1, 100, 300, 300, "sum", torch.int16),  # G=1, P=1
        (2, 1, 2, 5, 20, 600, 590, "max", torch.int32),  # several token blocks
    ],
)
def test_score_triton_matches_torch(b, hkv, g, p, c, nmax, length, aggregation, code_dtype):
    gen = torch.Generator().manual_seed(12)
    q = torch.randn(b, hkv * g, 4, generator=gen)
    tables = build_tables_torch(
        q, torch.randn(hkv, c, 4, generator=gen), torch.randn(p, 4, 4, generator=gen), aggregation
    )
    codes = torch.randint(0, c, (b, hkv, nmax), generator=gen).to(code_dtype)
    first_valid = torch.tensor([0, 9])[:b]  # left padding on the second sequence
    args = (tables, codes, length, first_valid, 3, 7, DistanceBuckets.geometric(p, 8.0, 2.0), aggregation)
    got = score_triton(*args, block=64)
    want = score_torch(*args)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert (got[1:, :, :9] == float("-inf")).all() and (got[..., -7:] == float("inf")).all()


@pytest.mark.parametrize(
    "b,hkv,g,n,d,k,dtype,splits",
    [
        (2, 2, 3, 40, 16, 13, torch.float32, None),  # G>1, K not a block multiple
        (1, 3, 1, 100, 8, 70, torch.bfloat16, None),  # G=1, several splits
        (2, 1, 4, 64, 16, 64, torch.float16, 3),  # forced split count
        (1, 1, 2, 10, 4, 5, torch.float32, 1),
    ],
)
def test_sparse_decode_triton_matches_torch(b, hkv, g, n, d, k, dtype, splits):
    gen = torch.Generator().manual_seed(13)
    q = torch.randn(b, hkv * g, d, generator=gen).to(dtype)
    k_cache = torch.randn(b, hkv, n, d, generator=gen).to(dtype)
    v_cache = torch.randn(b, hkv, n, d, generator=gen).to(dtype)
    indices = torch.stack([torch.randperm(n, generator=gen)[:k] for _ in range(b * hkv)]).reshape(b, hkv, k)
    keep = torch.rand(b, hkv, k, generator=gen) > 0.3
    keep[0, 0] = False  # a KV head with nothing kept outputs zeros
    got = sparse_decode_triton(q, k_cache, v_cache, indices, keep, d**-0.5, block_k=16, splits=splits)
    want = sparse_decode_torch(q, k_cache, v_cache, indices, keep, d**-0.5)
    assert got.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)
    assert torch.equal(got[0, :g], torch.zeros_like(got[0, :g]))


def test_sparse_decode_triton_at_full_selection_equals_dense_sdpa():
    gen = torch.Generator().manual_seed(14)
    b, hkv, g, n, d = 1, 2, 2, 40, 16
    q = torch.randn(b, hkv * g, d, generator=gen)
    k_cache = torch.randn(b, hkv, n, d, generator=gen)
    v_cache = torch.randn(b, hkv, n, d, generator=gen)
    indices = torch.randperm(n, generator=gen).expand(b, hkv, n)
    got = sparse_decode_triton(q, k_cache, v_cache, indices, torch.ones(b, hkv, n, dtype=torch.bool), d**-0.5)
    dense = torch.nn.functional.scaled_dot_product_attention(
        q.unsqueeze(2), k_cache, v_cache, enable_gqa=True
    ).squeeze(2)
    torch.testing.assert_close(got, dense, rtol=1e-5, atol=1e-5)


def test_dispatch_picks_torch_on_cpu_and_forces_triton_on_request():
    gen = torch.Generator().manual_seed(15)
    cpu = torch.zeros(1)
    assert resolve_backend("auto", cpu) == "torch" and resolve_backend("triton", cpu) == "triton"
    with pytest.raises(ValueError):
        resolve_backend("cuda", cpu)
    tables = prepare_codebook(torch.randn(1, 20, 16, generator=gen), torch.eye(16).unsqueeze(0))
    keys = torch.randn(1, 1, 9, 16, generator=gen)
    assert torch.equal(encode(keys, tables, backend="triton"), encode(keys, tables))
    scores = torch.randn(1, 2, 30, generator=gen)
    codes = torch.arange(30, dtype=torch.int16).expand(1, 2, 30)
    lookup = scores.unsqueeze(2).unsqueeze(3)
    args = (lookup, codes, 30, torch.zeros(1, dtype=torch.long), 2, 4, DistanceBuckets.single(), "sum", 10)
    idx_t, keep_t = score_select(*args, backend="triton")
    idx, keep = score_select(*args)
    assert keep.all() and torch.equal(idx.sort(-1).values, idx_t.sort(-1).values)
    assert torch.equal(idx, select_topk(score_torch(*args[:-1]), 10)[0])
    q = torch.randn(1, 2, 16, generator=gen)
    cache = torch.randn(1, 2, 30, 16, generator=gen)
    got = sparse_decode(q, cache, cache, idx, keep, 0.25, backend="triton")
    torch.testing.assert_close(got, sparse_decode(q, cache, cache, idx, keep, 0.25), rtol=1e-5, atol=1e-5)


def test_sparse_decode_triton_on_strided_caches():
    gen = torch.Generator().manual_seed(16)
    b, hkv, g, n, d, k = 2, 2, 2, 30, 16, 11
    q = torch.randn(b, hkv * g, d, generator=gen)
    k_cache = torch.randn(b, n, hkv, d, generator=gen).transpose(1, 2)  # tokens outermost
    v_cache = torch.randn(b, hkv, n + 5, d, generator=gen)[:, :, 5:]  # a slice of a preallocated cache
    indices = torch.randint(0, n, (b, hkv, k), generator=gen)
    keep = torch.rand(b, hkv, k, generator=gen) > 0.2
    got = sparse_decode_triton(q, k_cache, v_cache, indices, keep, 0.3, block_k=16)
    want = sparse_decode_torch(q, k_cache, v_cache, indices, keep, 0.3)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
