"""Scores of cached tokens and the recall metric: group aggregation, WRoPE scores with distance buckets, exact
RoPE logits, and attention-mass recall of a selection (what a step keeps is :mod:`a2ats_tools.selection`).

Shapes: ``B`` batch, ``Hq`` query heads, ``Hkv`` KV heads (``G = Hq // Hkv`` per group), ``N`` cached tokens,
``d`` head dim, ``C`` codes, ``P`` distance buckets.
"""

from __future__ import annotations

from typing import Any, Literal

import torch

from .rope import DistanceBuckets, Rotary

Aggregation = Literal["sum", "max", "softmax"]
AGGREGATIONS: tuple[str, ...] = ("sum", "max", "softmax")


def group_aggregate(
    scores: torch.Tensor, num_kv_heads: int, how: Aggregation, scale: float = 1.0, *, finite: bool = False
) -> torch.Tensor:
    """Aggregate per-query-head scores ``[..., Hq, N]`` into one score per KV head ``[..., Hkv, N]``.

    ``sum`` adds logits (linear, so it can be folded into the query); ``max`` takes the largest logit;
    ``softmax`` adds each head's softmax probabilities (``-inf`` entries are excluded; ``finite=True`` promises
    no row is all ``-inf``, which skips the pass that zeroes such rows' NaNs).
    """
    *lead, hq, n = scores.shape
    grouped = scores.reshape(*lead, num_kv_heads, hq // num_kv_heads, n)
    if how == "sum":
        return grouped.sum(-2)
    if how == "max":
        return grouped.amax(-2)
    if how == "softmax":
        probs = torch.softmax(grouped * scale, dim=-1)
        return (probs if finite else probs.nan_to_num(0.0)).sum(-2)
    raise ValueError(f"unknown aggregation {how!r}; choose from {AGGREGATIONS}")


def bucketed_scores(
    q_pre: torch.Tensor,
    q_pos: torch.Tensor,
    keys: torch.Tensor,
    rotary: Rotary,
    buckets: DistanceBuckets,
) -> torch.Tensor:
    """Approximate WRoPE scores of pre-RoPE queries against pre-RoPE (or codebook) keys.

    ``q_pre [Hq, M, d]`` at absolute positions ``q_pos [M]``; ``keys [Hkv, N, d]`` at positions ``0..N-1``.
    Token ``j`` seen from position ``t`` is scored as ``(R(centre(bucket(t - j))) q) . k``.
    Returns ``[Hq, M, N]`` (not causally masked).
    """
    hq, m, d = q_pre.shape
    hkv, n, _ = keys.shape
    g = hq // hkv
    centres = torch.tensor(buckets.centres)
    qw = rotary.apply(q_pre.float().unsqueeze(-2), *rotary.relative_cos_sin(centres))  # [Hq, M, P, d]
    qw = qw.reshape(hkv, g * m * buckets.count, d)
    all_scores = torch.bmm(qw, keys.float().transpose(1, 2)).reshape(hq, m, buckets.count, n)
    dist = q_pos.reshape(m, 1) - torch.arange(n).reshape(1, n)
    b = buckets.bucket_of(dist)  # [M, N]
    return all_scores.gather(2, b.reshape(1, m, 1, n).expand(hq, m, 1, n)).squeeze(2)


def exact_logits(q_pre: torch.Tensor, q_pos: torch.Tensor, keys_pre: torch.Tensor, rotary: Rotary) -> torch.Tensor:
    """True RoPE attention logits (unscaled) ``[Hq, M, N]`` of pre-RoPE queries and keys at their positions."""
    hq, m, d = q_pre.shape
    hkv, n, _ = keys_pre.shape
    cq, sq = rotary.cos_sin(q_pos)
    ck, sk = rotary.cos_sin(torch.arange(n))
    q = rotary.apply(q_pre.float(), cq, sq)
    k = rotary.apply(keys_pre.float(), ck, sk)
    return torch.bmm(q.reshape(hkv, (hq // hkv) * m, d), k.transpose(1, 2)).reshape(hq, m, n)


def mass_recall(
    true_logits: torch.Tensor,
    approx_scores: torch.Tensor | None,
    q_pos: torch.Tensor,
    settings: Any,
    scale: float,
    num_kv_heads: int,
) -> torch.Tensor:
    """Attention-mass recall ``[Hq, M]``: the share of exact softmax mass carried by the rows
    :func:`a2ats_tools.selection.select` keeps from ``approx_scores`` (no re-ranking).

    ``true_logits``/``approx_scores`` ``[Hq, M, N]``; query ``m`` sees keys ``0..q_pos[m]``, and each query is its
    own sample of the selection (its budget follows its context). The selection is shared by the query heads of a
    KV group (``settings.aggregation``). ``approx_scores=None`` selects by the exact logits themselves (the oracle
    upper bound for this budget).
    """
    from .selection import chosen_mask, select

    hq, m, n = true_logits.shape
    valid = torch.arange(n).reshape(1, n) <= q_pos.reshape(m, 1)  # [M, N]
    probs = torch.softmax((true_logits * scale).masked_fill(~valid, float("-inf")), dim=-1)
    source = true_logits if approx_scores is None else approx_scores
    agg = group_aggregate(source.masked_fill(~valid, float("-inf")).transpose(0, 1), num_kv_heads, settings.aggregation, scale)
    chosen = chosen_mask(select(agg, valid, settings), n)  # [M, Hkv, N]
    chosen = chosen.repeat_interleave(hq // num_kv_heads, 1).transpose(0, 1)  # [Hq, M, N]
    return (probs * chosen).sum(-1)
