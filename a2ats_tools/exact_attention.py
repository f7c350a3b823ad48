"""Exact attention over every key it is given, as the model itself computes it: the calibration capture and the
runtime's dense paths (prefill, windowed layers, dense layers) both call :func:`exact_attention`.

SDPA, except where the model soft-caps its logits (Gemma 2's ``attn_logit_softcapping``, passed to the attention
function as ``softcap``), which SDPA cannot do: there the logits are capped as the model's eager attention does.
"""

from __future__ import annotations

import torch
from torch import nn


def causal_mask(q_len: int, kv_len: int, device: torch.device) -> torch.Tensor:
    """``[q_len, kv_len]`` bool: each query sees the keys up to its own position, the queries being the newest."""
    q_pos = torch.arange(kv_len - q_len, kv_len, device=device)[:, None]
    return q_pos >= torch.arange(kv_len, device=device)[None, :]


def softcap_logits(logits: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """``softcap · tanh(logits / softcap)`` (identity without a cap): the model's cap on scaled logits."""
    return logits if softcap is None else torch.tanh(logits / softcap) * softcap


def exact_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    softcap: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """``[B, T, Hq, d]`` attention of ``query [B, Hq, T, d]`` over ``key``/``value [B, Hkv, N, d]``.

    No mask: purely causal with the queries as the newest rows (``is_causal`` where ``T == N``, an explicit mask
    otherwise, so SDPA never aligns ``is_causal`` to the wrong corner). A mask wider than the keys is cut to them.
    """
    kwargs.pop("is_causal", None)
    q_len, kv_len = query.shape[2], key.shape[2]
    key, value = key.to(query.device), value.to(query.device)
    if attention_mask is not None and attention_mask.shape[-1] != kv_len:
        attention_mask = attention_mask[..., :kv_len]
    aligned = attention_mask is None and q_len == kv_len
    if attention_mask is None and not aligned and q_len > 1:
        attention_mask = causal_mask(q_len, kv_len, query.device)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    if softcap is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scale, is_causal=aligned, **kwargs
        )
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    logits = softcap_logits((query.float() @ key.float().transpose(-1, -2)) * scale, softcap)
    if attention_mask is None:
        attention_mask = causal_mask(q_len, kv_len, query.device)
    if attention_mask.dtype == torch.bool:
        logits = logits.masked_fill(~attention_mask, float("-inf"))
    else:
        logits = logits + attention_mask.float()
    probs = torch.softmax(logits, dim=-1)
    out = probs.to(value.dtype) @ value
    return out.transpose(1, 2).contiguous(), None
