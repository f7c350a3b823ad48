"""The runtime's torch paths agree with the kernels it dispatches to on CUDA (Triton run by the interpreter)."""

from __future__ import annotations

import pytest
import torch

from a2ats_tools.runtime.settings import RuntimeSettings

kernels = pytest.importorskip("a2ats_tools.kernels.sparse_attention")
needs_triton = pytest.mark.skipif(kernels.triton is None, reason="triton is not installed")
BACKENDS = ["torch", pytest.param("triton", marks=needs_triton)]


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
