"""Runtime: retrieval-attention decode on tiny converted checkpoints (dense equality at 100% budget, padding,
chunked prefill, offload, budget accounting, the transformers quantizer path)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from a2ats_tools.artifacts.checkpoint import A2atsConfig, write_codebooks, write_config
from a2ats_tools.compat import cache_kwargs, output_cache
from a2ats_tools.errors import ArtifactError
from a2ats_tools.models import geometry, rotary
from a2ats_tools.rope import undo_rope
from a2ats_tools.runtime.selectors import SELECTOR_CLASSES

from .conftest import TINY_ARCHS, build_tiny_model


def sample_codebooks(model, codebook_size: int, seed: int = 0, tokens: int = 192):
    """k-means-free codebooks: rows sampled from the model's own pre-RoPE keys on random text (plus identity
    whitening). Enough to exercise the runtime; a real conversion trains query-aware VQ."""
    from transformers import DynamicCache

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (1, tokens), generator=g)
    cache = DynamicCache()
    with torch.no_grad():
        model(input_ids=ids, **cache_kwargs(cache), use_cache=True)
    rot = rotary(model)
    cos, sin = rot.cos_sin(torch.arange(tokens))
    books, whitening = [], []
    for layer in cache.layers:
        keys = undo_rope(layer.keys[0].float(), cos, sin)  # [Hkv, N, d]
        pick = torch.randperm(tokens, generator=g)[:codebook_size]
        books.append(keys[:, pick].contiguous())
        whitening.append(torch.eye(keys.shape[-1]).expand(keys.shape[0], -1, -1).contiguous())
    return books, whitening


def make_checkpoint(model, directory: Path, tokenizer=None, codebook_size: int = 64, **config_fields) -> Path:
    """Save ``model`` (+ tokenizer) as a converted checkpoint with sampled codebooks and the quantizer entry."""
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    books, whitening = sample_codebooks(model, codebook_size)
    write_codebooks(directory, books, whitening)
    cfg_path = directory / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["quantization_config"] = {"quant_method": "a2ats", "config_file": "a2ats_config.json"}
    cfg_path.write_text(json.dumps(cfg, indent=2))
    write_config(directory, A2atsConfig(geometry=geometry(model), codebook_size=codebook_size, whitening="plain", **config_fields))
    return directory


@pytest.fixture(scope="module")
def tiny_checkpoints(tmp_path_factory, tokenizer) -> dict[str, Path]:
    return {
        arch: make_checkpoint(build_tiny_model(arch), tmp_path_factory.mktemp(f"ckpt-{arch}"), tokenizer)
        for arch in TINY_ARCHS
    }


def dense_model(arch: str):
    return build_tiny_model(arch)


def load(path, **kw):
    from a2ats_tools import load_converted

    return load_converted(path, **kw)


def prompt_ids(n: int, batch: int = 1, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 49152, (batch, n), generator=g)


def decode_logits(model, ids: torch.Tensor, steps: int, cache=None, attention_mask=None, chunk: int = 0) -> torch.Tensor:
    """Prefill ``ids`` (in ``chunk``-token pieces if given, no padding) then feed ``steps`` fixed tokens one by
    one; stack the last-position logits ``[B, steps, V]``."""
    if chunk:
        for start in range(0, ids.shape[1], chunk):
            out = model(input_ids=ids[:, start : start + chunk], **cache_kwargs(cache), use_cache=True)
            cache = output_cache(out)
    else:
        out = model(input_ids=ids, attention_mask=attention_mask, **cache_kwargs(cache), use_cache=True)
    cache = output_cache(out)
    feed = prompt_ids(steps, ids.shape[0], seed=7)
    logits = []
    mask = attention_mask
    for i in range(steps):
        if mask is not None:
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        out = model(input_ids=feed[:, i : i + 1], attention_mask=mask, **cache_kwargs(cache), use_cache=True)
        logits.append(out.logits[:, -1])
    return torch.stack(logits, 1)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_full_budget_equals_dense(tiny_checkpoints, arch):
    model, _ = load(tiny_checkpoints[arch], budget=4096)
    dense = dense_model(arch)
    ids = prompt_ids(150, batch=2)
    with torch.no_grad():
        ours = decode_logits(model, ids, 6, cache=model.a2ats.new_cache())
        ref = decode_logits(dense, ids, 6)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


def test_low_budget_changes_output_and_respects_accounting(tiny_checkpoints):
    model, _ = load(tiny_checkpoints["llama"], budget=4, n_sink=2, window=8)
    dense = dense_model("llama")
    ids = prompt_ids(120, batch=2)
    cache = model.a2ats.new_cache()
    with torch.no_grad():
        ours = decode_logits(model, ids, 3, cache=cache)
        ref = decode_logits(dense, ids, 3)
    assert not torch.allclose(ours, ref, atol=1e-3)  # the sparse path is really in use
    for layer in cache.layers:
        indices, keep = layer.last_selection
        assert keep.sum(-1).max() <= 2 + 8 + 4  # rows read per KV head never exceed sinks + window + K
        assert keep.sum(-1).min() == 2 + 8 + 4
        kept = torch.where(keep, indices, torch.full_like(indices, -1))
        n = cache.get_seq_length()
        for b in range(2):
            for h in range(kept.shape[1]):
                rows = set(kept[b, h][kept[b, h] >= 0].tolist())
                assert set(range(2)) | set(range(n - 8, n)) <= rows  # sinks and window forced
                assert len(rows) == keep[b, h].sum()  # no duplicates


@pytest.mark.parametrize("selector", sorted(SELECTOR_CLASSES))  # every registered selector
def test_greedy_generate_full_budget_equals_dense(tiny_checkpoints, tokenizer, selector):
    model, _ = load(tiny_checkpoints["qwen3"], budget=1.0, selector=selector)
    dense = dense_model("qwen3")
    ids = prompt_ids(90)
    with torch.no_grad():
        ours = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0)
        ref = dense.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert ours.tolist() == ref.tolist()


def _padded_batch(lengths, seed=3):
    rows = [prompt_ids(n, seed=seed + i)[0] for i, n in enumerate(lengths)]
    width = max(lengths)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = r
        mask[i, width - len(r) :] = 1
    return rows, ids, mask


@pytest.mark.parametrize("budget", [1.0, 0.1])
def test_left_padded_batch_equals_per_sample(tiny_checkpoints, budget):
    model, _ = load(tiny_checkpoints["mistral"], budget=budget, n_sink=4, window=16)
    rows, ids, mask = _padded_batch([140, 100, 73])
    with torch.no_grad():
        batch = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
        for i, r in enumerate(rows):
            single = model.generate(r[None], max_new_tokens=8, do_sample=False, pad_token_id=0)
            assert batch[i, ids.shape[1] :].tolist() == single[0, len(r) :].tolist()


def test_padding_mask_is_honoured(tiny_checkpoints):
    """Pad tokens with real ids: results equal the unpadded run only because the mask hides them."""
    model, _ = load(tiny_checkpoints["llama"], budget=1.0)
    r = prompt_ids(60)[0]
    pad = prompt_ids(20, seed=9)[0]  # junk the mask must hide
    ids = torch.cat([pad, r])[None]
    mask = torch.cat([torch.zeros(20), torch.ones(60)]).long()[None]
    with torch.no_grad():
        masked = decode_logits(model, ids, 3, cache=model.a2ats.new_cache(), attention_mask=mask)
        alone = decode_logits(model, r[None], 3, cache=model.a2ats.new_cache())
        unmasked = decode_logits(model, ids, 3, cache=model.a2ats.new_cache(), attention_mask=torch.ones_like(mask))
    # position ids differ without generate's bookkeeping, so compare the mask's effect, not exact equality
    assert not torch.allclose(masked, unmasked, atol=1e-3)
    gen_pad = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    gen_alone = model.generate(r[None], max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert gen_pad[0, 80:].tolist() == gen_alone[0, 60:].tolist()
    assert alone.shape == masked.shape


@pytest.mark.parametrize("budget", [1.0, 0.1])
def test_chunked_prefill_equals_unchunked(tiny_checkpoints, budget):
    model, _ = load(tiny_checkpoints["qwen2"], budget=budget, n_sink=4, window=16)
    _, ids, mask = _padded_batch([130, 97])
    with torch.no_grad():
        whole = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
        chunked = model.generate(
            ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0, a2ats={"prefill_chunk": 32}
        )
        scores_a = model(input_ids=ids, attention_mask=mask).logits
    assert whole.tolist() == chunked.tolist()
    assert torch.isfinite(scores_a).all()


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_unpadded_chunked_prefill_full_budget_equals_dense(tiny_checkpoints, arch):
    """Unpadded prompt: the first chunk has no mask (SDPA is_causal), later chunks the explicit offset mask; a
    one-pass prefill is the is_causal case alone. Both decode the dense model's logits at a full budget."""
    model, _ = load(tiny_checkpoints[arch], budget=1.0)
    dense = dense_model(arch)
    ids = prompt_ids(100, batch=2)
    with torch.no_grad():
        ref = decode_logits(dense, ids, 3)
        whole = decode_logits(model, ids, 3, cache=model.a2ats.new_cache())
        chunked = decode_logits(model, ids, 3, cache=model.a2ats.new_cache(), chunk=32)
    torch.testing.assert_close(whole, ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(chunked, ref, atol=1e-4, rtol=1e-4)


def test_mask_is_left_out_only_for_aligned_unpadded_queries(tiny_checkpoints):
    """What the registered mask function gives the attention function: None (is_causal) for an unpadded prefill
    from row 0, an explicit mask for a later chunk or any padding."""
    model, _ = load(tiny_checkpoints["llama"], budget=1.0)
    seen = []
    real = model.model.layers[0].self_attn.forward

    def spy(*args, **kwargs):
        seen.append(kwargs.get("attention_mask"))
        return real(*args, **kwargs)

    model.model.layers[0].self_attn.forward = spy
    ids = prompt_ids(40, batch=2)
    with torch.no_grad():
        cache = model.a2ats.new_cache()
        model(input_ids=ids[:, :24], **cache_kwargs(cache), use_cache=True)
        model(input_ids=ids[:, 24:], **cache_kwargs(cache), use_cache=True)
        mask = torch.ones(2, 40, dtype=torch.long)
        mask[1, :5] = 0
        model(input_ids=ids, attention_mask=mask, **cache_kwargs(model.a2ats.new_cache()), use_cache=True)
    assert seen[0] is None and seen[1] is not None and seen[2] is not None


def test_generate_reserves_exactly_prompt_plus_new_tokens(tiny_checkpoints):
    """generate knows the final length: the cache allocates it once (no 1/8 headroom, no doubling); a reserve
    too small for the prompt falls back to headroom, and decoding past a reserve still grows the cache."""
    model, _ = load(tiny_checkpoints["llama"], budget=0.2)
    ids = prompt_ids(90, batch=2)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=7, do_sample=False, pad_token_id=0, return_dict_in_generate=True)
        capacities = {layer.state.capacity for layer in output_cache(out).layers}
        assert capacities == {90 + 7}
        small = model.a2ats.new_cache(reserve=10)
        model(input_ids=ids, **cache_kwargs(small), use_cache=True)
        assert small.layers[0].state.capacity == 192  # 90 + 64 headroom, rounded up to 64 rows
        exact = model.a2ats.new_cache(reserve=91)
        ref = decode_logits(model, ids, 4, cache=model.a2ats.new_cache())
        grown = decode_logits(model, ids, 4, cache=exact)  # the 2nd decode step outgrows the reserve: doubling
    assert exact.layers[0].state.capacity == 182
    torch.testing.assert_close(grown, ref)


def test_sampling_with_seed_is_reproducible(tiny_checkpoints):
    model, _ = load(tiny_checkpoints["llama"], budget=0.2)
    ids = prompt_ids(80)

    def run(seed):
        torch.manual_seed(seed)
        return model.generate(ids, max_new_tokens=10, do_sample=True, temperature=1.5, top_p=0.95, pad_token_id=0)

    with torch.no_grad():
        a, b, c = run(5), run(5), run(6)
    assert a.tolist() == b.tolist()
    assert a.tolist() != c.tolist()


@pytest.mark.parametrize("budget", [1.0, 0.1])
def test_offload_equals_no_offload(tiny_checkpoints, budget):
    model, _ = load(tiny_checkpoints["llama"], budget=budget, n_sink=4, window=16)
    ids = prompt_ids(150, batch=2)
    with torch.no_grad():
        plain_cache = model.a2ats.new_cache()
        plain = decode_logits(model, ids, 4, cache=plain_cache)
        off_cache = model.a2ats.new_cache(offload="cpu")
        off = decode_logits(model, ids, 4, cache=off_cache)
    torch.testing.assert_close(off, plain)
    assert off_cache.device_bytes() < plain_cache.device_bytes()  # only codes stay on the compute device


@pytest.mark.parametrize("kernels", ["auto", "torch"])
def test_a_decode_step_reads_only_its_candidates_and_kept_rows_of_the_store(tiny_checkpoints, kernels, monkeypatch):
    """The cache counts its K/V store's traffic: each decode step appends one row per layer and reads every
    candidate's key and every kept row's value (with offload, all that moves from host to device), the same on
    the fused kernel and the torch path, a small share of the cache."""
    import math

    from a2ats_tools.kernels import cpu_decode
    from a2ats_tools.runtime.cache import A2atsLayer
    from a2ats_tools.selection import kept_rows, top_k

    fused = []  # the fused kernel's calls
    monkeypatch.setattr(cpu_decode, "decode_layer", lambda *a, _f=cpu_decode.decode_layer: fused.append(1) or _f(*a))
    n_sink, window, budget, rerank, prompt, steps = 4, 16, 0.1, 2.0, 300, 3
    model, _ = load(tiny_checkpoints["llama"], budget=budget, n_sink=n_sink, window=window, rerank=rerank,
                    kernels=kernels)
    ids = prompt_ids(prompt, batch=2)
    cache = model.a2ats.new_cache(offload="cpu")
    with torch.no_grad():
        model(input_ids=ids, **cache_kwargs(cache), use_cache=True)
        after_prefill = cache.store_traffic()
        feed = prompt_ids(steps, 2, seed=7)
        for i in range(steps):
            model(input_ids=feed[:, i : i + 1], **cache_kwargs(cache), use_cache=True)
    read, written = cache.store_traffic()
    layers = [layer.state for layer in cache.layers if isinstance(layer, A2atsLayer)]
    b, h, _, d = layers[0].keys.shape
    row = d * layers[0].keys.element_size()
    assert after_prefill == (2 * len(layers) * b * h * prompt * row,) * 2  # prefill attends to all it wrote
    assert written - after_prefill[1] == 2 * len(layers) * b * h * steps * row
    expected = after_prefill[0]
    for length in range(prompt + 1, prompt + steps + 1):
        top = top_k(length, budget)
        kept = kept_rows(length, top, n_sink, window)
        candidates = min(length, kept - top + math.ceil(top * rerank))
        expected += len(layers) * b * h * (candidates + kept) * row
    assert read == expected
    assert (read - after_prefill[0]) / steps < 0.5 * 2 * len(layers) * b * h * (prompt + steps) * row  # far less than dense reads
    assert bool(fused) == (kernels == "auto" and cpu_decode.available())


def test_rerank_keeps_budget_and_full_budget_equality(tiny_checkpoints):
    model, _ = load(tiny_checkpoints["llama"], budget=6, n_sink=2, window=8, rerank=3.0)
    ids = prompt_ids(120)
    cache = model.a2ats.new_cache()
    with torch.no_grad():
        decode_logits(model, ids, 2, cache=cache)
    for layer in cache.layers:
        _, keep = layer.last_selection
        assert keep.sum(-1).max() <= 2 + 8 + 6
    full, _ = load(tiny_checkpoints["llama"], budget=1.0, rerank=2.0)
    with torch.no_grad():
        ours = decode_logits(full, ids, 2, cache=full.a2ats.new_cache())
        ref = decode_logits(dense_model("llama"), ids, 2)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


def test_short_context_decodes_densely_until_the_cache_outgrows_the_budget(tiny_checkpoints, monkeypatch):
    """While sinks + window + K cover every row, decode skips scoring (SDPA over the cache, the same result)."""
    from a2ats_tools.runtime.selectors import TokenSelector

    monkeypatch.setattr(TokenSelector, "full_keep_shortcut", True)
    model, _ = load(tiny_checkpoints["llama"], budget=4, n_sink=2, window=8)  # covers up to 14 rows
    ids = prompt_ids(10, batch=2)
    cache = model.a2ats.new_cache()
    with torch.no_grad():
        ours = decode_logits(model, ids, 3, cache=cache)  # 11..13 rows: every row kept
        ref = decode_logits(dense_model("llama"), ids, 3)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    assert all(layer.last_selection is None for layer in cache.layers)
    with torch.no_grad():
        for token in prompt_ids(3, batch=2, seed=9).T:  # 14..16 rows: the cache outgrows the budget
            model(input_ids=token[:, None], **cache_kwargs(cache), use_cache=True)
    idx, keep = cache.layers[0].last_selection
    assert keep.sum(-1).max() == 2 + 8 + 4 and cache.get_seq_length() == 16


def test_rerank_is_default_for_a2ats_only(tiny_checkpoints):
    """The default ``rerank`` re-ranks A²ATS's approximate scores; the streaming baseline stays pure recency."""
    model, _ = load(tiny_checkpoints["llama"], budget=6, n_sink=2, window=8, selector="streaming")
    assert model.a2ats.settings.rerank == 3.0
    ids = prompt_ids(120)
    cache = model.a2ats.new_cache()
    with torch.no_grad():
        decode_logits(model, ids, 1, cache=cache)
    n = cache.get_seq_length()
    idx, keep = cache.layers[0].last_selection
    for h in range(idx.shape[1]):  # sinks plus the most recent window + budget rows, nothing re-ranked in
        assert set(idx[0, h][keep[0, h]].tolist()) == set(range(2)) | set(range(n - 8 - 6, n))


def test_score_dtype_auto_is_float32_on_cpu_bf16_elsewhere_and_explicit_choices_stand():
    from a2ats_tools.errors import A2atsError
    from a2ats_tools.runtime.settings import RuntimeSettings, resolve_score_dtype

    assert resolve_score_dtype("auto") == resolve_score_dtype("auto", "cpu") == torch.float32
    assert resolve_score_dtype("auto", "cuda") == torch.bfloat16
    for device in ("cpu", "cuda"):
        assert resolve_score_dtype("float32", device) == torch.float32
        assert resolve_score_dtype("bfloat16", device) == torch.bfloat16
    with pytest.raises(A2atsError, match="score_dtype"):
        RuntimeSettings(score_dtype="fp8")


def test_log_buckets_full_budget_equals_dense(tiny_checkpoints):
    model, _ = load(tiny_checkpoints["qwen2"], budget=1.0, buckets="log", aggregation="max")
    ids = prompt_ids(200)
    with torch.no_grad():
        ours = decode_logits(model, ids, 3, cache=model.a2ats.new_cache())
        ref = decode_logits(dense_model("qwen2"), ids, 3)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        low = decode_logits(model, ids, 3, cache=model.a2ats.new_cache(budget=5, buckets="log:2"))
    assert torch.isfinite(low).all()


def test_runtime_log_buckets_are_the_ones_convert_writes():
    """``buckets="log"`` at load or per call means convert's default buckets (ratio 2), not some other spacing."""
    from a2ats_tools.quantization.convert import resolve_buckets
    from a2ats_tools.rope import DistanceBuckets
    from a2ats_tools.runtime.settings import RuntimeSettings

    written = resolve_buckets("log", 8192)
    settings = RuntimeSettings(max_distance=8192).with_overrides(buckets="log")
    assert settings.buckets == written and len(written.centres) == 7
    assert RuntimeSettings(max_distance=8192).with_overrides(buckets="log:1.5").buckets == DistanceBuckets.log_spaced(
        8192, ratio=1.5
    )


def test_geometry_mismatch_is_a_clear_error(tiny_checkpoints, tmp_path):
    from a2ats_tools.artifacts.checkpoint import read_codebooks, read_config
    from a2ats_tools.runtime.loader import attach

    config = read_config(tiny_checkpoints["llama"])
    books, whitening = read_codebooks(tiny_checkpoints["llama"], config)
    other = build_tiny_model("llama", num_key_value_heads=4)
    with pytest.raises(ArtifactError, match="num_kv_heads"):
        attach(other, config, books, whitening)


def test_from_pretrained_after_import_uses_retrieval_attention(tiny_checkpoints):
    from transformers import AutoModelForCausalLM

    import a2ats_tools  # noqa: F401 - registers the quantizer

    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoints["llama"])
    assert hasattr(model, "a2ats") and model.config._attn_implementation == "a2ats"
    ids = prompt_ids(100)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 104)
    layer = model.a2ats  # settings come from the checkpoint's a2ats_config.json
    assert layer.settings.budget == 0.03


def test_dense_layers_decode_exactly_and_others_still_select(tiny_checkpoints):
    """Every layer dense at a tiny budget equals dense attention; one dense layer leaves the rest sparse."""
    dense = dense_model("llama")
    ids = prompt_ids(120, batch=2)
    model, _ = load(tiny_checkpoints["llama"], budget=4, n_sink=2, window=8, dense_layers="0,1")
    with torch.no_grad():
        ours = decode_logits(model, ids, 3, cache=model.a2ats.new_cache())
        ref = decode_logits(dense, ids, 3)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)  # the tiny llama has 2 layers

    model, _ = load(tiny_checkpoints["llama"], budget=4, n_sink=2, window=8, dense_layers=[1])
    cache = model.a2ats.new_cache()
    with torch.no_grad():
        ours = decode_logits(model, ids, 3, cache=cache)
    assert not torch.allclose(ours, ref, atol=1e-3)
    assert cache.layers[1].selector.dense and not cache.layers[0].selector.dense
    assert cache.layers[0].last_selection is not None


def test_decode_defers_encoding_to_window_blocks_with_eager_codes(tiny_checkpoints):
    """Decode keys are encoded in blocks while still inside the window; every row outside it has its code, equal
    to encoding the cached key directly."""
    model, _ = load(tiny_checkpoints["llama"], budget=4, n_sink=2, window=8)
    cache = model.a2ats.new_cache()
    with torch.no_grad():
        decode_logits(model, prompt_ids(100, batch=2), 21, cache=cache)
    rot = rotary(model)
    for layer in cache.layers:
        st, sel = layer.state, layer.selector
        n = st.length
        encoded = st.meta.get("pending_start", n)
        assert n - encoded < 8  # pending keys are all inside the window
        assert encoded > 100  # decode keys were encoded, in blocks
        cos, sin = rot.cos_sin(torch.arange(n))
        expect = sel.encode(undo_rope(st.keys[:, :, :n].float(), cos, sin))
        assert torch.equal(st.meta["codes"][:, :, :encoded], expect[:, :, :encoded])


def test_deferred_encoding_undoes_each_samples_own_rotation(tiny_checkpoints):
    """Pending decode keys are taken back to pre-RoPE form with their own sample's rotation at their own step
    (positions differ per sample, as left padding makes them), when their block is encoded."""
    model, _ = load(tiny_checkpoints["llama"], budget=4, n_sink=2, window=8)
    cache = model.a2ats.new_cache()
    ids, feed = prompt_ids(60, batch=2), prompt_ids(21, batch=2, seed=7)
    shift = torch.tensor([[0], [37]])
    with torch.no_grad():
        model(input_ids=ids, position_ids=torch.arange(60) + shift, **cache_kwargs(cache), use_cache=True)
        for i in range(feed.shape[1]):
            step = torch.full((1, 1), 60 + i) + shift
            model(input_ids=feed[:, i : i + 1], position_ids=step, **cache_kwargs(cache), use_cache=True)
    cos, sin = rotary(model).cos_sin(torch.arange(81) + shift)  # [B, 81, d]
    for layer in cache.layers:
        st, sel = layer.state, layer.selector
        encoded = st.meta.get("pending_start", st.length)
        assert st.length == 81 and 60 < encoded <= 81
        expect = sel.encode(undo_rope(st.keys[:, :, :81].float(), cos[:, None], sin[:, None]))
        assert torch.equal(st.meta["codes"][:, :, :encoded], expect[:, :, :encoded])


def test_bad_settings_are_user_errors(tiny_checkpoints):
    from a2ats_tools.errors import A2atsError

    with pytest.raises(A2atsError, match="buckets"):
        load(tiny_checkpoints["llama"], buckets="weird")
    with pytest.raises(A2atsError, match=r"RATIO > 1\), got 'log:1'"):
        load(tiny_checkpoints["llama"], buckets="log:1")
    with pytest.raises(A2atsError, match="aggregation"):
        load(tiny_checkpoints["llama"], aggregation="mean")
    with pytest.raises(A2atsError, match="do not exist"):
        load(tiny_checkpoints["llama"], dense_layers="0,99")
    with pytest.raises(A2atsError, match="layer indices"):
        load(tiny_checkpoints["llama"], dense_layers="first")
    with pytest.raises(ArtifactError):
        load(tiny_checkpoints["llama"].parent / "missing")


@pytest.mark.slow
def test_embedded_smollm2_full_budget_and_paris(embedded_model, tokenizer):
    """SmolLM2 with a quickly sampled codebook: dense-equal at 100% budget, and it still knows Paris at 10%."""
    import copy

    from a2ats_tools.runtime.loader import attach

    books, whitening = sample_codebooks(embedded_model, 256, tokens=512)
    config = A2atsConfig(geometry=geometry(embedded_model), codebook_size=256, whitening="plain")
    model = attach(copy.deepcopy(embedded_model), config, books, whitening)
    filler = "France is a country in Western Europe. It has many cities, rivers and mountains, and a long history. "
    ids = tokenizer(filler * 12 + "The capital of France is", return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        ours = decode_logits(model, ids, 2, cache=model.a2ats.new_cache(budget=1.0))
        ref = decode_logits(embedded_model, ids, 2)
        out = model.generate(ids, max_new_tokens=3, do_sample=False, a2ats={"budget": 0.1, "n_sink": 4, "window": 16})
    torch.testing.assert_close(ours, ref, atol=2e-3, rtol=1e-3)
    assert "Paris" in tokenizer.decode(out[0, ids.shape[1] :])


def test_without_import_transformers_loads_the_dense_model(tiny_checkpoints):
    """transformers 5 skips an unknown quant_method (with a warning) and loads the plain model."""
    import subprocess
    import sys

    code = (
        "import sys; from transformers import AutoModelForCausalLM; "
        f"m = AutoModelForCausalLM.from_pretrained({str(tiny_checkpoints['llama'])!r}); "
        "print(hasattr(m, 'a2ats'), 'a2ats_tools' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "False"]


def test_beam_search_full_budget_equals_dense(tiny_checkpoints):
    model, _ = load(tiny_checkpoints["llama"], budget=1.0)
    ids = prompt_ids(70)
    with torch.no_grad():
        ours = model.generate(ids, max_new_tokens=6, num_beams=3, do_sample=False, pad_token_id=0)
        ref = dense_model("llama").generate(ids, max_new_tokens=6, num_beams=3, do_sample=False, pad_token_id=0)
        low = model.generate(ids, max_new_tokens=6, num_beams=3, do_sample=False, pad_token_id=0, a2ats={"budget": 4})
    assert ours.tolist() == ref.tolist()
    assert low.shape == ref.shape


def selection_keys(s: torch.Tensor):
    """Float scores with +inf (kept) / -inf (never kept) -> the selector's integer keys with their sentinels."""
    from a2ats_tools.selection import rank_keys

    keys, high, low = rank_keys(s)
    return keys.masked_fill(s == float("inf"), high).masked_fill(s == float("-inf"), low), high, low


def exact_of(sel, state, q_post):
    """The exact-logit callback the selector hands :func:`a2ats_tools.selection.select` for this state and query."""
    from a2ats_tools.runtime.selectors import candidate_logits

    return lambda rows: candidate_logits(state, q_post, rows, sel.num_kv_heads)


def prefilled_layer(path, n: int, batch: int, **settings):
    """Layer 1's ``(selector, state)`` after a prefill of ``n`` random tokens per sample, with ``settings``."""
    model, _ = load(path, **settings)
    cache = model.a2ats.new_cache()
    with torch.no_grad():
        model(input_ids=prompt_ids(n, batch=batch), **cache_kwargs(cache), use_cache=True)
    return cache.layers[1].selector, cache.layers[1].state


@pytest.mark.parametrize("how", ["sum", "softmax"])
def test_uniform_rerank_matches_the_general_path_and_reuses_its_logits(tiny_checkpoints, how):
    """Without padding, re-ranking takes a shortcut (no ordering or masking, exact logits kept for attention):
    it keeps the same rows as the general path, and attention from its logits equals attention from the keys."""
    from a2ats_tools.kernels.sparse_attention import sparse_decode_torch as sparse_decode
    from a2ats_tools.selection import rerank

    sel, state = prefilled_layer(tiny_checkpoints["llama"], 100, 2, budget=6, n_sink=2, window=8, rerank=2.0,
                                 rerank_aggregation=how)
    n = state.length
    g = torch.Generator().manual_seed(6)
    q_pre = torch.randn(2, sel.num_heads, sel.head_dim, generator=g)
    q_post = torch.randn(2, sel.num_heads, sel.head_dim, generator=g)
    approx = torch.randn(2, sel.num_kv_heads, n, generator=g)  # tie-free scores (VQ codes repeat)
    sel.scores = lambda *args: approx.clone()
    idx, keep, logits = sel.select(state, q_pre, q_post, n, torch.ones(2, n, dtype=torch.bool))
    assert logits is not None and keep.all() and idx.shape[-1] == 2 + 8 + 6
    s = approx.clone()
    s[..., :2] = float("inf")
    s[..., n - 8 :] = float("inf")
    general_idx, general_keep, _ = rerank(*selection_keys(s), torch.full((2,), 16), torch.full((2,), 6),
                                          exact_of(sel, state, q_post), sel.settings, sel.scale)
    for b in range(2):
        for h in range(sel.num_kv_heads):
            assert set(idx[b, h].tolist()) == set(general_idx[b, h][general_keep[b, h]].tolist())
    with_logits = sparse_decode(q_post, state.keys, state.values, idx, keep, 0.125, logits)
    from_keys = sparse_decode(q_post, state.keys, state.values, idx, keep, 0.125)
    torch.testing.assert_close(with_logits, from_keys, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("how", ["sum", "softmax"])
def test_rerank_of_a_padded_sample_ignores_its_padding(tiny_checkpoints, how):
    """A left-padded sample re-ranks as it would alone: padding rows fetched to fill the batch's largest candidate
    set never count (not even in the softmax normaliser of its candidates)."""
    from a2ats_tools.runtime.cache import LayerState
    from a2ats_tools.selection import rerank

    sel, state = prefilled_layer(tiny_checkpoints["llama"], 100, 2, budget=6, n_sink=2, window=8, rerank=2.0,
                                 rerank_aggregation=how)
    n, pad = state.length, state.length - 45  # sample 1 has 45 real rows: fewer than the 50 candidates of sample 0
    g = torch.Generator().manual_seed(9)
    q_post = torch.randn(2, sel.num_heads, sel.head_dim, generator=g)
    group = sel.num_heads // sel.num_kv_heads
    state.keys[1, :, :pad] = 4 * q_post[1, ::group, None, :]  # padding rows the first head of each group would love
    approx = torch.randn(2, sel.num_kv_heads, n, generator=g)
    s = approx.clone()
    s[1, :, :pad] = float("-inf")
    s[0, :, :2] = s[1, :, pad : pad + 2] = float("inf")
    s[..., n - 8 :] = float("inf")
    rows, top = torch.tensor([30, 30]), torch.tensor([20, 20])
    idx, keep, _ = rerank(*selection_keys(s), rows, top, exact_of(sel, state, q_post), sel.settings, sel.scale)
    alone = LayerState()
    alone.keys, alone.values = state.keys[1:, :, pad:n].contiguous(), state.values[1:, :, pad:n].contiguous()
    alone.length = n - pad
    alone_idx, alone_keep, _ = rerank(*selection_keys(s[1:, :, pad:]), rows[1:], top[1:],
                                      exact_of(sel, alone, q_post[1:]), sel.settings, sel.scale)
    for h in range(sel.num_kv_heads):
        assert set(idx[1, h][keep[1, h]].tolist()) == {i + pad for i in alone_idx[0, h][alone_keep[0, h]].tolist()}


@pytest.mark.parametrize("aggregation", ["sum", "max"])
@pytest.mark.parametrize("buckets", ["single", "log"])
def test_a2ats_scores_equal_a_per_token_computation(tiny_checkpoints, aggregation, buckets):
    """Every row's approximate score is its query, rotated to the centre of the row's distance bucket, dotted with
    the row's centroid (summed or maxed over the GQA group), for every sample and KV head of a batch."""
    from a2ats_tools.rope import apply_rope

    sel, state = prefilled_layer(tiny_checkpoints["llama"], 90, 3, budget=6, n_sink=2, window=8, aggregation=aggregation,
                                 buckets=buckets, score_dtype="float32")
    n = state.length
    q_pre = torch.randn(3, sel.num_heads, sel.head_dim, generator=torch.Generator().manual_seed(8))
    got = sel.scores(state, q_pre, q_pre, n)
    codes = state.meta["codes"][:, :, :n].long()
    bucket = sel.buckets.bucket_of((n - 1) - torch.arange(n))
    want = torch.empty(3, sel.num_kv_heads, n)
    for b in range(3):
        for h in range(sel.num_kv_heads):
            heads = q_pre[b, h * sel.group : (h + 1) * sel.group]  # [G, d]
            centroids = sel.codebook_t[h].T[codes[b, h]]  # [N, d]
            rotated = apply_rope(heads[:, None, :], sel.cos[bucket], sel.sin[bucket])  # [G, N, d]
            per_head = (rotated * centroids).sum(-1)
            want[b, h] = per_head.sum(0) if aggregation == "sum" else per_head.amax(0)
    torch.testing.assert_close(got.float(), want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_rank_keys_order_rows_as_their_scores_do(dtype):
    """The integer keys the top-K runs on sort exactly as the scores (negatives, zeros, infinities included) and
    stay strictly between the kept/never-kept sentinels."""
    from a2ats_tools.selection import rank_keys

    g = torch.Generator().manual_seed(3)
    s = (torch.randn(4, 300, generator=g) * 50).to(dtype)
    s[:, :4] = torch.tensor([float("inf"), float("-inf"), 0.0, -1e-3], dtype=dtype)
    keys, high, low = rank_keys(s)
    assert keys.dtype.itemsize == s.dtype.itemsize and keys.shape == s.shape
    assert bool((keys < high).all()) and bool((keys > low).all())
    by_key = s.gather(-1, keys.argsort(dim=-1, stable=True)).double()
    assert bool((by_key[:, 1:] >= by_key[:, :-1]).all())  # ascending keys = ascending scores
    want = torch.topk(s.double(), 40, -1).values
    got = s.gather(-1, torch.topk(keys.long(), 40, -1).indices).double()
    torch.testing.assert_close(got, want)
    ints = torch.tensor([[3, -7, 0, 12, -1]])
    assert torch.equal(torch.topk(rank_keys(ints)[0], 2).indices, torch.tensor([[3, 0]]))  # integer scores too


@pytest.mark.parametrize("shift", [0.0, -100.0, 2.5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unpadded_selection_is_a_true_top_k_whatever_the_scores_sign(tiny_checkpoints, shift, dtype):
    """The top-K ranks integer keys of the scores: rows whose top scores are negative (all negative: shift -100;
    mixed: 0; mostly positive: 2.5) get the true top-K, in float32 and bfloat16."""
    sel, state = prefilled_layer(tiny_checkpoints["llama"], 100, 2, budget=6, n_sink=2, window=8, rerank=0)
    n = state.length
    g = torch.Generator().manual_seed(12)
    approx = (torch.randn(2, sel.num_kv_heads, n, generator=g) + shift).to(dtype)
    sel.scores = lambda *args: approx.clone()
    q = torch.randn(2, sel.num_heads, sel.head_dim, generator=g)
    idx, keep, _ = sel.select(state, q, q, n, torch.ones(2, n, dtype=torch.bool))
    assert keep.all() and idx.shape[-1] == 2 + 8 + 6
    assert bool((idx[..., 1:] > idx[..., :-1]).all())  # ascending rows
    middle = approx[..., 2 : n - 8].float()
    want = torch.topk(middle, 6, dim=-1).indices + 2
    for b in range(2):
        for h in range(sel.num_kv_heads):
            expected = set(range(2)) | set(range(n - 8, n)) | set(want[b, h].tolist())
            picked = idx[b, h].tolist()
            # bf16 scores may tie: compare the picked scores, not only the rows
            got = sorted(approx[b, h, [i for i in picked if 2 <= i < n - 8]].float().tolist())
            assert got == sorted(middle[b, h, want[b, h] - 2].tolist())
            assert set(picked) >= set(range(2)) | set(range(n - 8, n))
            if dtype == torch.float32:
                assert set(picked) == expected


def test_sparse_decode_numerics_in_bf16_are_the_same_with_and_without_rerank_logits():
    """bf16 K/V: attention from the re-ranking's float32 logits and from the gathered keys accumulate alike
    (float32 products either way), so re-ranking does not change the attention's numerics."""
    from a2ats_tools.kernels.sparse_attention import sparse_decode_torch
    from a2ats_tools.runtime.selectors import candidate_logits

    g = torch.Generator().manual_seed(21)
    b, hkv, grp, n, d, k = 2, 2, 3, 300, 64, 40
    keys = (torch.randn(b, hkv, n, d, generator=g) * 3).to(torch.bfloat16)
    values = torch.randn(b, hkv, n, d, generator=g).to(torch.bfloat16)
    q = (torch.randn(b, hkv * grp, d, generator=g) * 3).to(torch.bfloat16)
    idx = torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(b * hkv)]).view(b, hkv, k)
    keep = torch.ones(b, hkv, k, dtype=torch.bool)
    state = type("State", (), {"keys": keys, "store_read_bytes": 0})()
    logits = candidate_logits(state, q, idx, hkv)
    with_logits = sparse_decode_torch(q, keys, values, idx, keep, d**-0.5, logits)
    from_keys = sparse_decode_torch(q, keys, values, idx, keep, d**-0.5)
    torch.testing.assert_close(with_logits, from_keys, atol=1e-6, rtol=1e-6)


def test_load_converted_reads_and_attaches_the_artifacts_once(tiny_checkpoints, monkeypatch):
    from a2ats_tools.runtime import hooks, loader

    reads, installs = [], []
    read, install = loader.read_codebooks, hooks.install
    monkeypatch.setattr(loader, "read_codebooks", lambda *a, **k: reads.append(1) or read(*a, **k))
    monkeypatch.setattr(hooks, "install", lambda *a, **k: installs.append(1) or install(*a, **k))
    model, _ = load(tiny_checkpoints["llama"], budget=7, window=9)
    assert len(reads) == 1 and len(installs) == 1
    assert model.a2ats.settings.budget == 7 and model.a2ats.settings.window == 9  # the caller's settings hold
