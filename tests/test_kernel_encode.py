"""The encode op: ``encode_torch`` (the runtime's CPU path) against the brute-force nearest whitened centroid,
and the Triton kernel (under the interpreter) against ``encode_torch`` on the same inputs."""

from __future__ import annotations

import pytest
import torch

from a2ats_tools.kernels import encode, encode_torch, encode_triton, prepare_codebook
from a2ats_tools.kernels._dispatch import triton_available

from .brute_force import nearest_whitened_centroid, random_whitening

needs_triton = pytest.mark.skipif(not triton_available(), reason="triton is not installed")


@pytest.mark.parametrize("temp_bytes", [1, 24 << 20])  # chunks of the 64-row minimum, and one chunk
def test_encode_is_whitened_nearest_centroid(temp_bytes):
    gen = torch.Generator().manual_seed(0)
    b, hkv, n, d, c = 2, 3, 50, 16, 37
    codebook = torch.randn(hkv, c, d, generator=gen)
    whitening = random_whitening(hkv, d, gen)
    keys = torch.randn(b, hkv, n, d, generator=gen).to(torch.bfloat16)
    codes = encode_torch(keys, prepare_codebook(codebook, whitening), temp_bytes=temp_bytes)
    assert codes.shape == (b, hkv, n) and codes.dtype == torch.int16
    assert torch.equal(codes.long(), nearest_whitened_centroid(keys, codebook, whitening))


def test_encode_uses_int32_codes_beyond_int16():
    gen = torch.Generator().manual_seed(1)
    codebook = torch.randn(1, 40000, 4, generator=gen)
    tables = prepare_codebook(codebook, torch.eye(4).unsqueeze(0))
    keys = codebook[:, [39999, 5, 33000]].unsqueeze(0)  # each key is a centroid
    codes = encode_torch(keys, tables)
    assert codes.dtype == torch.int32 and codes.tolist() == [[[39999, 5, 33000]]]


@needs_triton
@pytest.mark.parametrize(
    "b,hkv,n,d,c,dtype",
    [
        (2, 3, 50, 16, 37, torch.float16),  # C not a power of two, N not a block multiple
        (1, 2, 17, 8, 100, torch.float32),  # head dim below the 16 tl.dot minimum (padded)
        (2, 1, 5, 64, 300, torch.bfloat16),  # several codebook tiles
        (1, 1, 1, 16, 16, torch.float32),  # one decode-step key
        (1, 2, 9, 80, 50, torch.float32),  # head dim above 64: keys whitened before the kernel
        (2, 8, 20, 16, 64, torch.float32),  # eight KV heads
    ],
)
def test_encode_triton_matches_torch(b, hkv, n, d, c, dtype):
    gen = torch.Generator().manual_seed(10)
    tables = prepare_codebook(torch.randn(hkv, c, d, generator=gen), random_whitening(hkv, d, gen))
    keys = torch.randn(b, hkv, n, d, generator=gen).to(dtype)
    got = encode_triton(keys, tables, block_n=16, block_c=32 if d <= 64 else None)
    assert got.dtype == torch.int16
    assert torch.equal(got, encode_torch(keys, tables))


@needs_triton
def test_encode_triton_int32_codes_and_strided_keys():
    gen = torch.Generator().manual_seed(11)
    codebook = torch.randn(1, 32800, 16, generator=gen)
    tables = prepare_codebook(codebook, torch.eye(16).unsqueeze(0))
    chosen = [32799, 3, 32768, 12345]
    keys = codebook[:, chosen].unsqueeze(0).transpose(1, 2).contiguous().transpose(1, 2)  # non-contiguous
    got = encode_triton(keys, tables, block_n=16, block_c=4096)
    assert got.dtype == torch.int32 and got.tolist() == [[chosen]]


@needs_triton
def test_encode_dispatch_forces_triton_on_request():
    gen = torch.Generator().manual_seed(15)
    tables = prepare_codebook(torch.randn(1, 20, 16, generator=gen), torch.eye(16).unsqueeze(0))
    keys = torch.randn(1, 1, 9, 16, generator=gen)
    assert torch.equal(encode(keys, tables, backend="triton"), encode(keys, tables))


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_selector_encode_is_the_encode_op(backend):
    """The A²ATS selector encodes through this op (the fused CPU kernel, where it runs, gives the same codes up
    to float ties)."""
    from a2ats_tools.models import rotary
    from a2ats_tools.runtime.selectors import A2atsSelector
    from a2ats_tools.runtime.settings import RuntimeSettings

    from .conftest import build_tiny_model

    g = torch.Generator().manual_seed(1)
    hkv, c, d = 2, 32, 16
    codebook = torch.randn(hkv, c, d, generator=g)
    whitening = random_whitening(hkv, d, g)
    keys = torch.randn(2, hkv, 50, d, generator=g)
    theirs = encode(keys, prepare_codebook(codebook, whitening), backend=backend)
    for kernels in ("torch", "auto"):
        sel = A2atsSelector(RuntimeSettings(kernels=kernels), 0, 4, hkv, d, codebook=codebook, whitening=whitening,
                            rotary=rotary(build_tiny_model("llama")))
        ours = sel.encode(keys)
        if kernels == "torch":
            assert torch.equal(ours, encode_torch(keys, sel.encode_tables))
        assert (ours.long() == theirs.long()).float().mean() > 0.99  # float ties aside, the same nearest centroid
