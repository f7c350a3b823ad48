"""The sparse attention op: ``sparse_decode_torch`` (the runtime's CPU path) against a dense masked softmax, and
the Triton kernel (under the interpreter) against ``sparse_decode_torch`` on the same inputs."""

from __future__ import annotations

import pytest
import torch

from a2ats_tools.kernels import gather_rows, sparse_decode, sparse_decode_torch, sparse_decode_triton
from a2ats_tools.kernels._dispatch import resolve_backend, triton_available

from .brute_force import masked_attention

needs_triton = pytest.mark.skipif(not triton_available(), reason="triton is not installed")


def selection(b, hkv, n, k, gen, kept=0.7):
    indices = torch.stack([torch.randperm(n, generator=gen)[:k] for _ in range(b * hkv)]).reshape(b, hkv, k)
    keep = torch.rand(b, hkv, k, generator=gen) < kept
    keep[..., 0] = True
    return indices, keep


@pytest.mark.parametrize("g", [1, 2, 3, 8])
def test_sparse_decode_matches_masked_dense_softmax(g):
    gen = torch.Generator().manual_seed(4)
    b, hkv, n, d, k = 2, 2, 40, 16, 13
    q = torch.randn(b, hkv * g, d, generator=gen)
    k_cache, v_cache = torch.randn(b, hkv, n, d, generator=gen), torch.randn(b, hkv, n, d, generator=gen)
    indices, keep = selection(b, hkv, n, k, gen)
    out = sparse_decode_torch(q, k_cache, v_cache, indices, keep, 0.25)
    torch.testing.assert_close(out, masked_attention(q, k_cache, v_cache, indices, keep, 0.25), rtol=1e-5, atol=1e-5)


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


def test_sparse_decode_from_given_logits_equals_from_keys():
    """Logits the re-ranking computed spare the key gather: the same output."""
    gen = torch.Generator().manual_seed(7)
    b, hkv, g, n, d, k = 2, 2, 2, 30, 8, 9
    q = torch.randn(b, hkv * g, d, generator=gen)
    k_cache, v_cache = torch.randn(b, hkv, n, d, generator=gen), torch.randn(b, hkv, n, d, generator=gen)
    indices, keep = selection(b, hkv, n, k, gen)
    logits = q.reshape(b, hkv, g, d) @ gather_rows(k_cache, indices).transpose(-1, -2)
    torch.testing.assert_close(sparse_decode_torch(q, k_cache, v_cache, indices, keep, 0.3, logits),
                               sparse_decode_torch(q, k_cache, v_cache, indices, keep, 0.3), rtol=1e-6, atol=1e-6)


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
    assert torch.equal(gather_rows(k_cache, indices), k_sel)


@needs_triton
@pytest.mark.parametrize(
    "b,hkv,g,n,d,k,dtype,splits",
    [
        (2, 2, 3, 40, 16, 13, torch.float32, None),  # G>1, K not a block multiple
        (1, 3, 1, 100, 8, 70, torch.bfloat16, None),  # G=1, several splits
        (2, 1, 4, 64, 16, 64, torch.float16, 3),  # forced split count
        (1, 1, 2, 10, 4, 5, torch.float32, 1),
        (2, 1, 8, 48, 16, 20, torch.float32, None),  # G=8
    ],
)
def test_sparse_decode_triton_matches_torch(b, hkv, g, n, d, k, dtype, splits):
    gen = torch.Generator().manual_seed(13)
    q = torch.randn(b, hkv * g, d, generator=gen).to(dtype)
    k_cache = torch.randn(b, hkv, n, d, generator=gen).to(dtype)
    v_cache = torch.randn(b, hkv, n, d, generator=gen).to(dtype)
    indices, keep = selection(b, hkv, n, k, gen)
    keep[0, 0] = False  # a KV head with nothing kept outputs zeros
    got = sparse_decode_triton(q, k_cache, v_cache, indices, keep, d**-0.5, block_k=16, splits=splits)
    want = sparse_decode_torch(q, k_cache, v_cache, indices, keep, d**-0.5)
    assert got.dtype == want.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)
    assert torch.equal(got[0, :g], torch.zeros_like(got[0, :g]))


@needs_triton
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


@needs_triton
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


def test_dispatch_picks_torch_on_cpu_and_forces_triton_on_request():
    gen = torch.Generator().manual_seed(15)
    cpu = torch.zeros(1)
    assert resolve_backend("auto", cpu) == "torch"
    with pytest.raises(ValueError):
        resolve_backend("cuda", cpu)
    q = torch.randn(1, 2, 16, generator=gen)
    cache = torch.randn(1, 2, 30, 16, generator=gen)
    idx, keep = selection(1, 2, 30, 10, gen)
    want = sparse_decode_torch(q, cache, cache, idx, keep, 0.25)
    assert torch.equal(sparse_decode(q, cache, cache, idx, keep, 0.25), want)
    if triton_available():
        assert resolve_backend("triton", cpu) == "triton"
        got = sparse_decode(q, cache, cache, idx, keep, 0.25, backend="triton")
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
