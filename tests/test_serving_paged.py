"""Serving over a paged KV cache: the rows, codes and decode step a serving engine's blocks give equal those of the
transformers runtime's contiguous cache, for the same selector (no serving engine needed)."""

from __future__ import annotations

import pytest
import torch

from a2ats_tools.kernels.sparse_attention import sparse_decode_torch
from a2ats_tools.rope import undo_rope, undo_rope_keys
from a2ats_tools.runtime.cache import LayerState
from a2ats_tools.runtime.step import StepContext
from a2ats_tools.selection import chosen_mask
from a2ats_tools.serving.paged import CodeStore, PagedRows, decode_rows
from a2ats_tools.serving.retrieval import ServedCheckpoint, layer_index

from .conftest import build_tiny_model
from .test_runtime import make_checkpoint

BLOCK = 16


@pytest.fixture(scope="module")
def served(tmp_path_factory, tokenizer):
    directory = make_checkpoint(build_tiny_model("llama"), tmp_path_factory.mktemp("served"), tokenizer, budget=0.1)
    return ServedCheckpoint(directory)


def paged_pool(lengths: list[int], num_blocks: int, seed: int = 0):
    """Block tables that scatter each request over a shuffled pool (no block shared)."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(num_blocks, generator=g)
    tables, used = [], 0
    width = max(-(-n // BLOCK) for n in lengths)
    for n in lengths:
        blocks = -(-n // BLOCK)
        table = torch.zeros(width, dtype=torch.long)
        table[:blocks] = order[used : used + blocks]
        used += blocks
        tables.append(table)
    return torch.stack(tables)


def test_paged_decode_equals_contiguous(served):
    """Two requests of different lengths, scattered over shuffled blocks: codes written as keys arrive and the
    decode step pick the same rows and give the same output as the selector over a left-padded contiguous cache."""
    layer = served.layers[0]
    sel, rot = layer.selector, layer.rotary
    hkv, d, hq = sel.num_kv_heads, sel.head_dim, sel.num_heads
    lengths = [300, 173]
    num_blocks = 64
    g = torch.Generator().manual_seed(1)
    table = paged_pool(lengths, num_blocks)
    key_pool = torch.zeros(num_blocks, hkv, BLOCK, d)
    value_pool = torch.zeros(num_blocks, hkv, BLOCK, d)
    store = layer.new_code_store(num_blocks * BLOCK)
    width = max(lengths)
    keys_dense = torch.zeros(len(lengths), hkv, width, d)
    values_dense = torch.zeros_like(keys_dense)
    for b, n in enumerate(lengths):
        pos = torch.arange(n)
        keys_pre = torch.randn(n, hkv, d, generator=g)
        cos, sin = rot.cos_sin(pos)
        keys_post = rot.apply(keys_pre.transpose(0, 1), cos, sin).transpose(0, 1)  # [n, Hkv, d]
        values = torch.randn(n, hkv, d, generator=g)
        slots = table[b, pos // BLOCK] * BLOCK + pos % BLOCK
        key_pool[slots // BLOCK, :, slots % BLOCK] = keys_post
        value_pool[slots // BLOCK, :, slots % BLOCK] = values
        cuts = [*range(0, n - 8, 97), *range(n - 8, n + 1)]  # prefill chunks, then one token per decode step
        for start, stop in zip(cuts[:-1], cuts[1:], strict=True):
            layer.encode(store, keys_post[start:stop], pos[start:stop], slots[start:stop])
        keys_dense[b, :, width - n :] = keys_post.transpose(0, 1)
        values_dense[b, :, width - n :] = values.transpose(0, 1)
    rows = decode_rows(torch.tensor(lengths), table, BLOCK)
    q_post = torch.randn(len(lengths), hq, d, generator=g)
    out, chosen = layer.decode(q_post, PagedRows(key_pool, rows), PagedRows(value_pool, rows), store, StepContext(), 0.25)

    state = LayerState()
    state.keys, state.values, state.length, state.capacity = keys_dense, values_dense, width, width
    cos, sin = rot.cos_sin(rows.positions)
    codes = torch.zeros(len(lengths), hkv, width, dtype=sel.code_dtype)
    for b, n in enumerate(lengths):
        c, s = rot.cos_sin(torch.arange(n))
        codes[b, :, width - n :] = sel.encode(undo_rope_keys(keys_dense[b : b + 1, :, width - n :], c[None], s[None]))[0]
    state.meta["codes"] = codes
    assert torch.equal(store.read(rows).masked_fill(~rows.valid[:, None], 0), codes)
    q_pre = undo_rope(q_post, cos[:, None], sin[:, None])
    sel.scale = 0.25
    ref = sel.select(state, q_pre, q_post, width, rows.valid)
    ref_out = sparse_decode_torch(q_post, keys_dense, values_dense, ref.indices, ref.keep, 0.25, ref.logits)
    assert torch.equal(chosen_mask(chosen, width), chosen_mask(ref, width))
    assert not bool((chosen_mask(chosen, width) & ~rows.valid[:, None]).any()), "a padding row was kept"
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)


def test_code_store_skips_padding_slots():
    store = CodeStore(8, 2, torch.int16)
    store.write(torch.tensor([3, -1, 5]), torch.tensor([[1, 2], [9, 9], [3, 4]]))
    assert store.codes[3].tolist() == [1, 2] and store.codes[5].tolist() == [3, 4]
    assert int(store.codes.abs().sum()) == 10


def test_layer_index_from_engine_names():
    assert layer_index("model.layers.12.self_attn.attn") == 12
    assert layer_index("language_model.model.layers.0.self_attn.attn") == 0
    with pytest.raises(Exception, match="cannot tell the decoder layer"):
        layer_index("encoder.attn")


def test_served_checkpoint_builds_selectors_without_weights(served):
    """The model's definition comes from config.json alone (no weights loaded), every layer of a full-attention
    model is retrieved, and the settings are the checkpoint's (the torch paths: an engine's cache is paged)."""
    assert [layer is not None for layer in served.layers] == [True, True]
    assert served.settings.budget == 0.1 and served.settings.kernels == "torch"
