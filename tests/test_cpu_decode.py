"""The fused CPU decode kernel (kernels/cpu_decode.cpp) against its torch reference: the selector's ``select``
followed by ``sparse_decode_torch``, i.e. what the runtime runs with ``kernels=torch``."""

from __future__ import annotations

import pytest
import torch

from a2ats_tools.compat import cache_kwargs
from a2ats_tools.errors import A2atsError
from a2ats_tools.kernels import cpu_decode
from a2ats_tools.kernels.sparse_attention import sparse_decode_torch
from a2ats_tools.rope import DistanceBuckets, undo_rope
from a2ats_tools.runtime.cache import LayerState
from a2ats_tools.runtime.selectors import A2atsSelector
from a2ats_tools.runtime.settings import RuntimeSettings, use_cpu_kernel

needs_kernel = pytest.mark.skipif(not cpu_decode.available(), reason=cpu_decode.unavailable_reason() or "built")


def make_step(
    length: int, *, seed: int = 0, distinct_codes: bool = True, pad: tuple[int, int] = (0, 0), codes: int = 2048,
    **settings,
):
    """A selector with a random codebook over a random cache of ``length`` rows, and one step's queries;
    ``pad``: left-padding rows of each of the two samples."""
    from a2ats_tools.models import rotary

    from .conftest import build_tiny_model

    g = torch.Generator().manual_seed(seed)
    b, hq, hkv, d, c = 2, 6, 2, 16, codes
    settings.setdefault("buckets", DistanceBuckets.log_spaced(2048))
    rs = RuntimeSettings(n_sink=4, window=16, **settings)
    rot = rotary(build_tiny_model("llama"))
    sel = A2atsSelector(rs, 0, hq, hkv, d, codebook=torch.randn(hkv, c, d, generator=g),
                        whitening=torch.eye(d).expand(hkv, d, d), rotary=rot)
    state = LayerState()
    state.capacity, state.length, state.device = length + 5, length, torch.device("cpu")
    state.keys = torch.randn(b, hkv, state.capacity, d, generator=g)
    state.values = torch.randn(b, hkv, state.capacity, d, generator=g)
    if distinct_codes:  # every row its own code: no two rows share a table entry, so no score ties
        codes = torch.stack([torch.randperm(c, generator=g)[: state.capacity] for _ in range(b * hkv)])
    else:
        codes = torch.randint(0, 8, (b * hkv, state.capacity), generator=g)
    state.meta["codes"] = codes.view(b, hkv, -1).to(torch.int16)
    q_post = torch.randn(b, hq, d, generator=g) * 2
    cos, sin = rot.cos_sin(torch.tensor([[length - 1], [length + 40]]))  # [B, 1, d]: each sample its position
    valid = torch.arange(length) >= torch.tensor(pad)[:, None]
    return sel, state, q_post, (cos[:, 0], sin[:, 0]), valid


def reference(sel, state, q_post, rope, valid):
    """What the attention function runs on the torch path: undo RoPE, select, sparse attention."""
    q_pre = undo_rope(q_post, rope[0][:, None], rope[1][:, None])
    indices, keep, logits = sel.select(state, q_pre, q_post, state.length, valid)
    out = sparse_decode_torch(q_post, state.keys, state.values, indices, keep, sel.scale, logits)
    return out, indices.masked_fill(~keep, -1).sort(-1).values


@needs_kernel
@pytest.mark.parametrize(
    ("rerank", "how", "buckets", "budget", "pad", "approx"),
    [
        (2.0, "softmax", "log", 0.05, (0, 0), "sum"),
        (2.0, "sum", "log", 0.05, (0, 0), "sum"),
        (1.5, "max", "single", 0.1, (0, 0), "sum"),
        (0.0, "softmax", "log", 0.05, (0, 0), "sum"),
        (0.0, "softmax", "single", 30, (0, 0), "sum"),
        (3.0, "softmax", "log", 200, (0, 0), "sum"),  # the candidates outnumber the middle rows: every row is kept
        (2.0, "softmax", "log", 0.05, (0, 300), "sum"),  # left padding: its own sinks and budget per sample
        (0.0, "sum", "single", 0.1, (250, 17), "sum"),
        (2.0, "softmax", "log", 0.2, (0, 660), "sum"),  # 40 real rows: sinks and window cover them all
        # approximate scores aggregated per head (one table per query head): max, and each head's softmax
        (0.0, "softmax", "log", 0.05, (0, 0), "softmax"),
        (2.0, "softmax", "log", 0.05, (0, 0), "softmax"),
        (0.0, "sum", "single", 30, (0, 0), "softmax"),
        (2.0, "softmax", "log", 0.05, (0, 300), "softmax"),
        (0.0, "softmax", "log", 0.05, (0, 0), "max"),
        (2.0, "max", "single", 0.1, (250, 17), "max"),
    ],
)
def test_fused_step_matches_select_and_sparse_decode(rerank, how, buckets, budget, pad, approx):
    bucket_spec = DistanceBuckets.log_spaced(2048) if buckets == "log" else DistanceBuckets.single(512)
    sel, state, q_post, rope, valid = make_step(
        700, rerank=rerank, rerank_aggregation=how, buckets=bucket_spec, budget=budget, score_dtype="float32",
        pad=pad, aggregation=approx,
    )
    ref_out, ref_rows = reference(sel, state, q_post, rope, valid)
    out, rows = sel.fused_decode(state, q_post, rope, state.length, valid, sel.scale)
    assert rows.shape == ref_rows.shape
    assert torch.equal(rows.sort(-1).values, ref_rows)  # the same rows (-1 pads a sample that keeps fewer)
    assert ((rows[..., 1:] > rows[..., :-1]) | (rows[..., 1:] == -1)).all()  # ascending, then the -1 padding
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)


@needs_kernel
@pytest.mark.parametrize("approx", ["sum", "max", "softmax"])
def test_long_caches_split_into_spans_match_the_torch_path(approx):
    """More middle rows than one scoring span, and more candidates and kept rows than one exact-row span: the
    spans' scores, cuts and partial attentions give what one pass over the row gives."""
    sel, state, q_post, rope, valid = make_step(
        20000, codes=20480, rerank=2.0, rerank_aggregation="softmax", budget=0.05, score_dtype="float32",
        pad=(0, 3000), aggregation=approx,
    )
    ref_out, ref_rows = reference(sel, state, q_post, rope, valid)
    out, rows = sel.fused_decode(state, q_post, rope, state.length, valid, sel.scale)
    assert (rows >= 0).sum(-1).min() > 2 * 256  # several spans of kept rows per (sample, KV head)
    assert torch.equal(rows.sort(-1).values, ref_rows)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)


@needs_kernel
def test_ties_keep_the_earliest_rows_and_every_forced_row():
    sel, state, q_post, rope, valid = make_step(
        300, distinct_codes=False, rerank=0.0, budget=10, buckets=DistanceBuckets.single(512)
    )
    state.meta["codes"].zero_()  # every row the same code, one bucket: every middle row ties
    _, rows = sel.fused_decode(state, q_post, rope, state.length, valid, sel.scale)
    n_sink, window = sel.settings.n_sink, sel.settings.window
    expected = torch.cat([torch.arange(n_sink + 10), torch.arange(300 - window, 300)])
    assert torch.equal(rows, expected.expand_as(rows))


@needs_kernel
@pytest.mark.parametrize("approx", ["sum", "max"])
def test_rows_sharing_a_cell_tie_to_the_earliest_across_spans(approx):
    """Few codes, log buckets and several scoring spans: many rows share each (bucket, code) cell, so the cut
    falls inside a cell's rows; the kernel keeps every row of a better cell and the earliest rows of that one, as
    a stable sort of the torch scores does."""
    length, budget = 40000, 0.05
    sel, state, q_post, rope, valid = make_step(
        length, distinct_codes=False, codes=16, rerank=0.0, budget=budget, score_dtype="float32", aggregation=approx,
        buckets=DistanceBuckets.log_spaced(32768),
    )
    _, rows = sel.fused_decode(state, q_post, rope, state.length, valid, sel.scale)
    q_pre = undo_rope(q_post, rope[0][:, None], rope[1][:, None])
    scores = sel.scores(state, q_pre, q_post, length)  # [B, Hkv, N]
    n_sink, window, top = sel.settings.n_sink, sel.settings.window, round(budget * length)
    middle = scores[..., n_sink : length - window]
    assert (middle.unsqueeze(-1) == middle[..., :50].unsqueeze(-2)).sum() > 50 * 100  # the ties are many
    order = torch.sort(-middle, dim=-1, stable=True).indices[..., :top] + n_sink
    forced = torch.cat([torch.arange(n_sink), torch.arange(length - window, length)])
    expected = torch.cat([order, forced.expand(*order.shape[:2], -1)], -1).sort(-1).values
    assert torch.equal(rows, expected)


@needs_kernel
@pytest.mark.parametrize("length", [3, 20, 24])
def test_short_caches_keep_every_row(length):
    """Sinks and window overlapping or covering the cache: every row is attended, the output is dense attention."""
    sel, state, q_post, rope, valid = make_step(length, budget=5)
    out, rows = sel.fused_decode(state, q_post, rope, length, valid, sel.scale)
    assert torch.equal(rows, torch.arange(length).expand_as(rows))
    b, hq, d = q_post.shape
    k = state.keys[:, :, :length].repeat_interleave(sel.group, 1)
    v = state.values[:, :, :length].repeat_interleave(sel.group, 1)
    dense = torch.softmax((q_post.unsqueeze(2) @ k.transpose(-1, -2)) * sel.scale, -1) @ v
    torch.testing.assert_close(out, dense.squeeze(2), atol=1e-5, rtol=1e-5)


@needs_kernel
def test_masks_with_holes_and_bf16_tables_take_the_torch_path():
    sel, state, q_post, rope, valid = make_step(200, budget=10)
    holes = valid.clone()
    holes[0, 50:55] = False  # not left padding
    assert sel.fused_decode(state, q_post, rope, 200, holes, sel.scale) is None
    sel.settings = sel.settings.with_overrides(score_dtype="bfloat16")  # the kernel's tables are float32
    assert sel.fused_decode(state, q_post, rope, 200, valid, sel.scale) is None
    sel.settings = sel.settings.with_overrides(score_dtype="auto", kernels="torch")
    assert sel.fused_decode(state, q_post, rope, 200, valid, sel.scale) is None
    sel.settings = sel.settings.with_overrides(kernels="cpu")
    assert sel.fused_decode(state, q_post, rope, 200, valid, sel.scale) is not None


def test_kernels_cpu_without_a_compiler_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("A2ATS_CPU_KERNEL", "0")
    cpu_decode._load.cache_clear()
    try:
        assert not cpu_decode.available()
        assert not use_cpu_kernel("auto", torch.zeros(1))  # auto falls back to the torch path
        with pytest.raises(A2atsError, match="A2ATS_CPU_KERNEL=0"):
            use_cpu_kernel("cpu", torch.zeros(1))
    finally:
        cpu_decode._load.cache_clear()
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    monkeypatch.setenv("A2ATS_CACHE", str(tmp_path))
    monkeypatch.delenv("A2ATS_CPU_KERNEL")
    try:
        assert not cpu_decode.available() and "failed" in cpu_decode.unavailable_reason()
    finally:
        cpu_decode._load.cache_clear()


@needs_kernel
def test_the_library_is_built_once_per_cache_and_atomically(tmp_path, monkeypatch):
    monkeypatch.setenv("A2ATS_CACHE", str(tmp_path))
    cpu_decode._load.cache_clear()
    try:
        assert cpu_decode.available()
        built = list((tmp_path / "kernels").iterdir())
        assert len(built) == 1 and built[0].suffix == ".so"  # no temporary left beside it
    finally:
        cpu_decode._load.cache_clear()


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory, tokenizer):
    from .conftest import build_tiny_model
    from .test_runtime import make_checkpoint

    return make_checkpoint(
        build_tiny_model("qwen3"), tmp_path_factory.mktemp("cpu-kernel-ckpt"), tokenizer, codebook_size=128
    )


def test_kernels_cpu_that_cannot_build_fails_at_load_not_at_the_first_step(tiny_checkpoint, monkeypatch):
    from a2ats_tools import load_converted

    monkeypatch.setenv("A2ATS_CPU_KERNEL", "0")
    cpu_decode._load.cache_clear()
    try:
        with pytest.raises(A2atsError, match="kernels=cpu: .*A2ATS_CPU_KERNEL=0"):
            load_converted(tiny_checkpoint, kernels="cpu")
        model, _ = load_converted(tiny_checkpoint)  # auto still loads, and a per-cache override is checked too
        with pytest.raises(A2atsError, match="kernels=cpu"):
            model.a2ats.new_cache(kernels="cpu")
    finally:
        cpu_decode._load.cache_clear()


@needs_kernel
@pytest.mark.parametrize(
    ("budget", "aggregation", "scaling"), [(1.0, "sum", None), (6, "sum", None), (6, "softmax", None), (6, "sum", 2.0)]
)
def test_runtime_with_the_cpu_kernel_matches_its_torch_path(tiny_checkpoint, budget, aggregation, scaling, monkeypatch):
    """Decoding a tiny model with kernels=cpu gives the logits and rows of kernels=torch, the kernel running in
    every layer of every step (the dense shortcut off, so at a full budget too). After the prefill each row gets
    its own code, so no two approximate scores tie: tied rows are the one place the two may differ (the kernel
    keeps the earliest, torch's top-K any). ``scaling``: an attention scale other than head_dim**-0.5 (as models
    with their own query scalar have), which both paths' re-ranking by attention mass must use."""
    from a2ats_tools import load_converted
    from a2ats_tools.runtime.selectors import TokenSelector

    from .test_runtime import prompt_ids

    calls = []
    real = cpu_decode.decode_layer
    monkeypatch.setattr(cpu_decode, "decode_layer", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(TokenSelector, "full_keep_shortcut", False)
    model, _ = load_converted(tiny_checkpoint, budget=budget, n_sink=2, window=8, aggregation=aggregation)
    if scaling is not None:
        for layer in model.model.layers:
            layer.self_attn.scaling = scaling
    ids, feed = prompt_ids(90, batch=2), prompt_ids(3, batch=2, seed=7)
    distinct = torch.randperm(128, generator=torch.Generator().manual_seed(0))[:90].to(torch.int16)
    out, caches, prefill_codes = {}, {}, {}
    with torch.no_grad():
        for kernels in ("torch", "cpu"):
            cache = caches[kernels] = model.a2ats.new_cache(kernels=kernels)
            model(input_ids=ids, **cache_kwargs(cache), use_cache=True)
            prefill_codes[kernels] = [layer.state.meta["codes"][:, :, :90].clone() for layer in cache.layers]
            for layer in cache.layers:
                layer.state.meta["codes"][:, :, :90] = distinct
            steps = [model(input_ids=feed[:, i : i + 1], **cache_kwargs(cache), use_cache=True).logits[:, -1]
                     for i in range(feed.shape[1])]
            out[kernels] = torch.stack(steps, 1)
    assert len(calls) == model.config.num_hidden_layers * 3
    for a, b in zip(prefill_codes["torch"], prefill_codes["cpu"], strict=True):
        assert torch.equal(a, b)  # the kernel's encode gave the prefill the same codes
    torch.testing.assert_close(out["cpu"], out["torch"], atol=1e-4, rtol=1e-4)
    for a, b in zip(caches["torch"].layers, caches["cpu"].layers, strict=True):
        assert torch.equal(a.last_selection[0].sort(-1).values, b.last_selection[0])


@needs_kernel
@pytest.mark.parametrize("codes", [16, 2048])
def test_fused_encode_matches_the_torch_encode(codes):
    """The kernel's nearest centroid (matmul and argmax fused) equals the selector's torch encode, in the
    whitened metric; duplicated centroids tie, and both keep the lowest code."""
    from a2ats_tools.models import rotary

    from .conftest import build_tiny_model

    g = torch.Generator().manual_seed(5)
    hkv, d = 2, 16
    codebook = torch.randn(hkv, codes, d, generator=g)
    codebook[:, codes // 2 :] = codebook[:, : codes // 2]  # every centroid twice: the second copy never wins
    a = torch.randn(hkv, d, d, generator=g) * 0.3
    whitening = torch.linalg.cholesky(a @ a.transpose(1, 2) + torch.eye(d))
    keys = torch.randn(3, hkv, 301, d, generator=g) * 2
    out = {}
    for kernels in ("torch", "cpu"):
        sel = A2atsSelector(RuntimeSettings(kernels=kernels), 0, 4, hkv, d, codebook=codebook, whitening=whitening,
                            rotary=rotary(build_tiny_model("llama")))
        out[kernels] = sel.encode(keys)
    assert out["cpu"].dtype == torch.int16 and out["cpu"].shape == (3, hkv, 301)
    assert torch.equal(out["cpu"], out["torch"])
    assert int(out["cpu"].max()) < codes // 2
