"""Long KV caches for timing without a long prefill: the keys and values of a real dense prefill, tiled.

A real dense prefill at 128K tokens costs hours on a small CPU (attention grows with the square of the
context), while a decode step's cost depends on how many keys it reads, not on where they came from. So a
*synthetic* cache of ``length`` tokens takes the post-RoPE keys and the values of a real prefill of ``n`` tokens,
takes the keys back to pre-RoPE form, and places row ``p % n`` at every position ``p < length``, rotating the
key to ``p`` with the rotary embedding of that layer's type (a hybrid model's sliding layers have their own).
Every row is then what the model would have cached for that key at that position. A windowed (sliding or
chunked) layer keeps only its window: the source's last rows, rotated to the target's last positions (the rows
the tiling puts there when ``n`` divides ``length``). Dense and A²ATS contenders are given the same cache.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from ..models import FULL, layer_types, rotary, rotary_module
from ..rope import Rotary, apply_rope, undo_rope_keys
from .prefill import Prefilled, real_prefill, sync

TILE_CHUNK = 16384  # target positions rotated at a time (bounds the scratch of one layer)
LENGTH_DEPENDENT_ROPE = ("dynamic", "longrope")  # rope types whose frequencies change with the sequence length


def rerotate(keys: torch.Tensor, rot: Rotary, source_pos: torch.Tensor, target_pos: torch.Tensor) -> torch.Tensor:
    """Post-RoPE ``keys [B, H, n, d]`` at ``source_pos [n]`` -> the same keys rotated to ``target_pos [n]``."""
    cos, sin = rot.cos_sin(source_pos)
    pre = undo_rope_keys(keys, cos[None], sin[None], rot.layout)
    cos, sin = rot.cos_sin(target_pos)
    return apply_rope(pre, cos[None, None], sin[None, None], rot.layout).to(keys.dtype)


def tiled_keys(keys: torch.Tensor, rot: Rotary, length: int) -> torch.Tensor:
    """Post-RoPE ``keys [B, H, n, d]`` at positions ``0..n-1`` tiled to ``length`` rows, row ``p`` holding source
    row ``p % n`` rotated to position ``p``."""
    b, h, n, d = keys.shape
    device = keys.device
    src = torch.arange(n, device=device)
    cos, sin = rot.cos_sin(src)
    pre = undo_rope_keys(keys, cos[None], sin[None], rot.layout)  # float32
    out = torch.empty(b, h, length, d, dtype=keys.dtype, device=device)
    for start in range(0, length, TILE_CHUNK):
        pos = torch.arange(start, min(length, start + TILE_CHUNK), device=device)
        cos, sin = rot.cos_sin(pos)
        out[:, :, start : start + len(pos)] = apply_rope(pre[:, :, pos % n], cos[None, None], sin[None, None],
                                                         rot.layout)
    return out


def tiled_values(values: torch.Tensor, length: int) -> torch.Tensor:
    """``values [B, H, n, d]`` tiled to ``length`` rows (row ``p`` = source row ``p % n``)."""
    n = values.shape[-2]
    return values[:, :, torch.arange(length, device=values.device) % n]


@torch.no_grad()
def tile_cache(model: Any, source: Any, length: int) -> Any:
    """A transformers ``DynamicCache`` of ``length`` tokens built from ``source``, the ``DynamicCache`` of a real
    dense prefill of ``model`` (positions ``0..n-1``, unpadded); see the module docstring."""
    from transformers import DynamicCache

    n = source.get_seq_length()
    if n < 1 or length < n:
        raise ValueError(f"a synthetic cache of {length} tokens needs a source of 1..{length} tokens, got {n}")
    types = layer_types(model)
    rotaries = {t: rotary(model, t) for t in set(types)}
    cache = DynamicCache(config=model.config)
    for i, (src, kind) in enumerate(zip(source.layers, types, strict=True)):
        rot = rotaries[kind]
        if getattr(src, "is_sliding", False):
            kept = src.keys.shape[-2]  # the window's rows, at positions n - kept .. n - 1
            device = src.keys.device
            offsets = torch.arange(kept, device=device) - kept
            keys = rerotate(src.keys, rot, n + offsets, length + offsets)
            cache.update(keys, src.values.clone(), i)
            cache.layers[i].cumulative_length = length  # the window's layer counts every token it has seen
        else:
            cache.update(tiled_keys(src.keys, rot, length), tiled_values(src.values, length), i)
    return cache


def synthetic_kind(source_tokens: int) -> str:
    """The ``cache`` label of a point built this way."""
    return f"synthetic(from {source_tokens})"


def synthetic_prefill(model: Any, source_ids: torch.Tensor, length: int) -> Prefilled:
    """A real dense prefill of ``source_ids [B, n]`` tiled to ``length`` tokens (the model in dense mode);
    ``seconds`` is the source prefill plus the tiling."""
    source = real_prefill(model, source_ids)
    device = source_ids.device
    t0 = time.perf_counter()
    cache = tile_cache(model, source.cache, length)
    sync(device)
    seconds = source.seconds + time.perf_counter() - t0
    n = source_ids.shape[1]
    return Prefilled(tiled_ids(source_ids, length), cache, source.first, seconds, synthetic_kind(n), n)


def tiled_ids(ids: torch.Tensor, length: int) -> torch.Tensor:
    """Prompt ``ids [B, n]`` tiled to ``length`` columns as :func:`tile_cache` tiles the cache (the prompt a
    synthetic cache stands for: what ``generate`` is given beside it)."""
    return ids[:, torch.arange(length, device=ids.device) % ids.shape[1]]


def length_dependent_rope(model: Any) -> str | None:
    """The rope type of a full-attention layer whose frequencies change with the sequence length (``dynamic``,
    ``longrope``: past ``max_position_embeddings`` the model's forward switches to other frequencies than a
    cache or A²ATS's scores computed at native ones), or None where frequencies are fixed (default, linear,
    llama3, yarn: any position can be timed)."""
    kind = getattr(rotary_module(model), "rope_type", "default")
    if isinstance(kind, dict):  # one per layer type (Gemma 3)
        kind = kind.get(FULL, "default")
    return str(kind) if kind in LENGTH_DEPENDENT_ROPE else None
