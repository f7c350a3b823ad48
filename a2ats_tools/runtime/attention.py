"""The ``a2ats`` attention function and mask function, registered with transformers' interfaces.

Prefill (more than one query) is dense and exact: SDPA with the explicit mask (``is_causal`` only for an aligned,
unpadded prefill from row 0, where transformers leaves the mask out), over the
cache. A decode step (one query) asks the layer's selector for rows and attends exactly to those rows only,
with the true RoPE query and post-RoPE keys. Sliding and chunked layers always attend densely to their window.
A soft-capping model (Gemma 2) gets its cap on every path; its decode steps take the torch path (the fused
kernels do not cap).
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from ..exact_attention import exact_attention
from ..kernels import sparse_attention
from ..rope import undo_rope
from .cache import A2atsLayer
from .settings import use_triton
from .step import StepContext

NAME = "a2ats"


def a2ats_mask(*args, **kwargs):
    """``sdpa_mask``, which leaves the mask out (None) only where it is purely causal and aligned: no padding,
    and either one query (decode) or as many queries as keys (a prefill starting at 0). There the attention
    function uses SDPA's ``is_causal`` (cheaper than an explicit mask); a chunk
    after the first, or any padding, gets the explicit mask."""
    return sdpa_mask(*args, **kwargs)


def _valid_rows(step: StepContext, attention_mask: torch.Tensor | None, batch: int, length: int, device) -> torch.Tensor:
    """``[B, length]`` real (non-padding) tokens, from the decode step's mask (computed once per step and mask)."""

    def compute() -> torch.Tensor:
        if attention_mask is None:
            return torch.ones(batch, length, dtype=torch.bool, device=device)
        row = attention_mask[:, 0, -1, :length]
        valid = row if row.dtype == torch.bool else row == 0
        return valid.expand(batch, length)

    return step.shared(("valid_rows", batch, length), compute, attention_mask)


def _last_position(step: StepContext, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The step's rotary factors ``[B or 1, 1, d]`` at its (last) position -> ``[B or 1, d]``: the same objects
    for every layer of a step (the model passes every layer the same ``position_embeddings``), so that what the
    selector derives from them is derived once per step."""
    return step.shared("last_position", lambda: (cos[:, -1], sin[:, -1]), cos, sin)


def a2ats_attention_forward(
    module, query, key, value, attention_mask, scaling=None, dropout=0.0, softcap=None, **kwargs
):
    """transformers attention function: exact attention for prefill, windowed layers and dense layers; retrieval
    attention for decode once the cache outgrows the budget (before that, selection would keep every row)."""
    cache = getattr(module, "_a2ats_cache", None)
    layer = cache.layers[module.layer_idx] if cache is not None else None
    sparse = isinstance(layer, A2atsLayer) and query.shape[2] == 1 and not layer.selector.dense
    if sparse:
        valid = _valid_rows(layer.state.step, attention_mask, query.shape[0], layer.state.length, query.device)
        sparse = not layer.selector.keeps_everything(layer.state, valid, layer.state.length)
    if not sparse:  # prefill, windowed and dense layers, decode steps whose budget still covers the whole cache
        if isinstance(layer, A2atsLayer):  # reads the whole store
            layer.state.store_read_bytes += key.numel() * key.element_size() + value.numel() * value.element_size()
        return exact_attention(module, query, key, value, attention_mask, scaling, softcap, dropout, **kwargs)
    st = layer.state
    b, hq, _, d = query.shape
    scale = scaling if scaling is not None else d**-0.5
    if layer.selector.scale != scale:  # the model's softmax scale, for group softmax aggregations on every path
        layer.selector.scale = scale
    cos, sin = layer.rope
    q_post = query[:, :, 0]  # [B, Hq, d]
    fused = None
    if softcap is None:
        fused = layer.selector.fused_decode(st, q_post, _last_position(st.step, cos, sin), st.length, valid, scale)
    if fused is not None:
        out, picked = fused
        layer.last_selection = picked  # -1 pads the rows of samples that keep fewer (left padding)
        return out.to(query.dtype).unsqueeze(1), None
    q_pre = undo_rope(q_post.float(), cos[:, -1:].float(), sin[:, -1:].float(), layer.selector.layout)
    chosen = layer.selector.select(st, q_pre, q_post, st.length, valid)
    layer.last_selection = (chosen.indices, chosen.keep)
    if softcap is None and use_triton(layer.selector.settings.kernels, q_post, st.keys, st.values):
        out = sparse_attention.sparse_decode_triton(q_post, st.keys, st.values, chosen.indices, chosen.keep, scale)
    else:
        out = sparse_attention.sparse_decode_torch(
            q_post, st.keys, st.values, chosen.indices, chosen.keep, scale, chosen.logits, softcap
        )
        rows = chosen.indices.numel() * (1 if chosen.logits is not None else 2)  # values, and keys without logits
        st.store_read_bytes += rows * d * st.values.element_size()
    return out.to(query.dtype).unsqueeze(1), None  # [B, 1, Hq, d]


def register() -> None:
    """Register the attention and mask functions under ``"a2ats"`` (idempotent)."""
    AttentionInterface.register(NAME, a2ats_attention_forward)
    AttentionMaskInterface.register(NAME, a2ats_mask)
