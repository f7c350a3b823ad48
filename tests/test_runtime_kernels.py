"""The runtime's torch paths agree with the kernels it dispatches to on CUDA (Triton run by the interpreter)."""

from __future__ import annotations

import pytest
import torch

from a2ats_tools.runtime.attention import sparse_decode
from a2ats_tools.runtime.selectors import A2atsSelector
from a2ats_tools.runtime.settings import RuntimeSettings

kernels = pytest.importorskip("a2ats_tools.kernels.sparse_attention")
needs_triton = pytest.mark.skipif(kernels.triton is None, reason="triton is not installed")
BACKENDS = ["torch", pytest.param("triton", marks=needs_triton)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_sparse_decode_matches_kernel(backend):
    g = torch.Generator().manual_seed(0)
    b, hq, hkv, cap, d, k = 2, 4, 2, 40, 16, 9
    q = torch.randn(b, hq, d, generator=g)
    keys, values = torch.randn(b, hkv, cap, d, generator=g), torch.randn(b, hkv, cap, d, generator=g)
    indices = torch.stack([torch.randperm(30, generator=g)[:k] for _ in range(b * hkv)]).view(b, hkv, k)
    keep = torch.rand(b, hkv, k, generator=g) > 0.3
    keep[..., 0] = True
    ours = sparse_decode(q, keys, values, indices, keep, 0.25)
    theirs = kernels.sparse_decode(q, keys, values, indices, keep, 0.25, backend=backend)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_encode_matches_kernel(backend):
    import importlib

    from a2ats_tools.models import rotary

    from .conftest import build_tiny_model

    enc = importlib.import_module("a2ats_tools.kernels.encode")
    g = torch.Generator().manual_seed(1)
    hkv, c, d = 2, 32, 16
    codebook = torch.randn(hkv, c, d, generator=g)
    a = torch.randn(hkv, d, d, generator=g) * 0.3
    whitening = torch.linalg.cholesky(a @ a.transpose(1, 2) + torch.eye(d))
    sel = A2atsSelector(RuntimeSettings(), 0, 4, hkv, d, codebook=codebook, whitening=whitening,
                        rotary=rotary(build_tiny_model("llama")))
    keys = torch.randn(2, hkv, 50, d, generator=g)
    ours = sel.encode(keys)
    theirs = enc.encode(keys, enc.prepare_codebook(codebook, whitening), backend=backend)
    assert (ours.long() == theirs.long()).float().mean() > 0.99  # float ties aside, the same nearest centroid
    sel.ENCODE_TEMP_BYTES = 1  # chunks of the 64-row minimum: 100 rows in two chunks give the same codes
    assert torch.equal(sel.encode(keys), ours)


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


@pytest.fixture(scope="module")
def tiny_llama_checkpoint(tmp_path_factory, tokenizer):
    from .conftest import build_tiny_model
    from .test_runtime import make_checkpoint

    return make_checkpoint(build_tiny_model("llama"), tmp_path_factory.mktemp("kernels-ckpt"), tokenizer)


@needs_triton
@pytest.mark.parametrize("budget", [1.0, 6])
def test_runtime_with_triton_kernels_matches_its_torch_paths(tiny_llama_checkpoint, budget, monkeypatch):
    """The whole runtime with kernels=triton (encode, score gather and sparse attention in the interpreter: the
    path CUDA takes) decodes the same logits as with kernels=torch, at a full and at a small budget."""
    import importlib

    from a2ats_tools import load_converted

    from .test_runtime import decode_logits, prompt_ids

    calls: dict[str, int] = {}
    for module, name in (("encode", "encode_triton"), ("score_select", "score_triton"),
                         ("sparse_attention", "sparse_decode_triton")):
        mod = importlib.import_module(f"a2ats_tools.kernels.{module}")

        def spy(*args, _real=getattr(mod, name), _name=name, **kwargs):
            calls[_name] = calls.get(_name, 0) + 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(mod, name, spy)

    model, _ = load_converted(tiny_llama_checkpoint, budget=budget, n_sink=2, window=8)
    ids = prompt_ids(90, batch=2)
    out, caches = {}, {}
    with torch.no_grad():
        for kernels in ("torch", "triton"):
            caches[kernels] = model.a2ats.new_cache(kernels=kernels)
            out[kernels] = decode_logits(model, ids, 3, cache=caches[kernels])
    assert set(calls) == {"encode_triton", "score_triton", "sparse_decode_triton"}  # every kernel ran, once per layer+step
    assert calls["sparse_decode_triton"] == 2 * 3
    torch.testing.assert_close(out["triton"], out["torch"], atol=1e-4, rtol=1e-4)
    for a, b in zip(caches["torch"].layers, caches["triton"].layers, strict=True):
        assert torch.equal(a.state.meta["codes"], b.state.meta["codes"])  # the Triton encode gave the same codes
        assert torch.equal(a.last_selection[0].sort(-1).values, b.last_selection[0].sort(-1).values)


def test_kernels_setting_is_checked(monkeypatch):
    from a2ats_tools.errors import A2atsError
    from a2ats_tools.kernels import _dispatch
    from a2ats_tools.runtime.settings import use_triton

    with pytest.raises(A2atsError, match="kernels"):
        RuntimeSettings(kernels="cuda")
    with pytest.raises(A2atsError, match="offload"):
        RuntimeSettings(kernels="triton", offload="cpu")
    assert not use_triton("auto", torch.zeros(1)) and not use_triton("torch", torch.zeros(1))
    monkeypatch.setattr(_dispatch, "triton", None)  # as on a machine without triton
    assert not use_triton("auto", torch.zeros(1))
    with pytest.raises(A2atsError, match="not installed"):
        use_triton("triton", torch.zeros(1))


@needs_triton
def test_triton_kernels_on_cpu_tensors_need_the_interpreter(monkeypatch):
    from a2ats_tools.errors import A2atsError
    from a2ats_tools.kernels._dispatch import resolve_backend
    from a2ats_tools.runtime.settings import use_triton

    assert use_triton("triton", torch.zeros(1))  # the tests run with TRITON_INTERPRET=1
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(A2atsError, match="on the CPU"):
        use_triton("triton", torch.zeros(1))
    with pytest.raises(RuntimeError, match="CUDA tensors"):
        resolve_backend("triton", torch.zeros(1))
