"""Capture pre-RoPE queries and keys from any transformers RoPE decoder, through public extension points only.

Two pieces work together:

* a forward pre-hook (with kwargs) on every attention module stashes the ``position_embeddings`` (cos, sin)
  the decoder passes to it;
* an attention function registered with ``transformers.AttentionInterface`` (and the SDPA mask builder
  registered under the same name with ``AttentionMaskInterface``, otherwise masks are silently dropped) receives
  the rotated queries and keys, undoes RoPE on the new ones with the stashed cos/sin, hands the pre-RoPE states
  (after any q/k-norm, which these models apply before RoPE) to a sink, and then computes attention exactly as
  the model does (:func:`a2ats_tools.exact_attention.exact_attention`: SDPA, or soft-capped logits).

Only the layers the sink is given are captured (the retrieved, full-attention ones); the others just attend.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from ..errors import CapturedStateError
from ..exact_attention import exact_attention
from ..models import attention_modules, retrieval_layers, rotary
from ..rope import HALVES, undo_rope

ATTN_NAME = "a2ats_capture"

# sink(layer_idx, queries [B, Hq, T, d], keys [B, Hkv, T, d]) -- pre-RoPE, float32, new tokens only
Sink = Callable[[int, torch.Tensor, torch.Tensor], None]

_active: dict[str, object] = {"sink": None, "stash": {}, "layers": frozenset(), "layout": HALVES}


def capture_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """The registered attention function: record pre-RoPE states, then attend exactly."""
    sink = _active["sink"]
    layer = int(module.layer_idx)
    if sink is not None and layer in _active["layers"]:
        stash = _active["stash"]
        if layer not in stash:
            raise RuntimeError(f"no position embeddings were stashed for attention layer {layer}")
        cos, sin = stash.pop(layer)
        t = query.shape[2]
        cos = cos[:, None, -t:, :].to(torch.float32)
        sin = sin[:, None, -t:, :].to(torch.float32)
        layout = _active["layout"]  # the model's own pairing (partial rotary: only the rotated dimensions)
        q = undo_rope(query.float(), cos, sin, layout)
        k = undo_rope(key[:, :, -t:, :].float(), cos, sin, layout)
        if not (torch.isfinite(q).all() and torch.isfinite(k).all()):
            raise CapturedStateError(
                f"captured queries/keys of layer {layer} contain NaN or Inf; try --dtype float32 or another model"
            )
        sink(layer, q, k)
    return exact_attention(module, query, key, value, attention_mask, scaling, dropout=dropout, **kwargs)


def _register_interfaces() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTN_NAME, capture_attention_forward)
    AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)


def _stash_position_embeddings(module: nn.Module, args: tuple, kwargs: dict) -> None:
    pe = kwargs.get("position_embeddings")
    if pe is None and len(args) > 1:
        pe = args[1]
    if pe is None:
        raise RuntimeError(f"{type(module).__name__} was called without position_embeddings")
    _active["stash"][int(module.layer_idx)] = pe


@contextmanager
def capturing(model: nn.Module, sink: Sink) -> Iterator[None]:
    """Within the block, every forward of ``model`` reports pre-RoPE queries/keys of each retrieved
    (full-attention) layer to ``sink``."""
    _register_interfaces()
    layout = rotary(model).layout  # probed with the model's own attention, before it is replaced
    previous = model.config._attn_implementation
    layers = frozenset(retrieval_layers(model))
    handles = [
        m.register_forward_pre_hook(_stash_position_embeddings, with_kwargs=True)
        for m in attention_modules(model)
        if int(m.layer_idx) in layers
    ]
    model.set_attn_implementation(ATTN_NAME)
    _active.update(sink=sink, stash={}, layers=layers, layout=layout)
    try:
        yield
    finally:
        _active.update(sink=None, stash={}, layers=frozenset(), layout=HALVES)
        for h in handles:
            h.remove()
        model.set_attn_implementation(previous)
