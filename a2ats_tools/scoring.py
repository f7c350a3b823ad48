"""The reference semantics of A²ATS token selection, shared by the conversion report, eval and the runtime.

Shapes: ``B`` batch, ``Hq`` query heads, ``Hkv`` KV heads (``G = Hq // Hkv`` per group), ``N`` cached tokens,
``d`` head dim, ``C`` codes, ``P`` distance buckets. Everything here is plain, vectorised torch; the runtime's
kernels (and their torch references in :mod:`a2ats_tools.kernels`) must agree with it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from .rope import DistanceBuckets, Rotary

Aggregation = Literal["sum", "max", "softmax"]
AGGREGATIONS: tuple[str, ...] = ("sum", "max", "softmax")


@dataclass(frozen=True)
class SelectionPolicy:
    """What is always kept and how many more tokens are picked per KV head. Its field defaults are the
    project's selection defaults: ``RuntimeSettings`` and the checkpoint config take theirs from here."""

    n_sink: int = 8
    window: int = 64
    budget: float | int = 0.03  # a fraction of the context (float < 1) or a token count (int)
    aggregation: Aggregation = "sum"

    def budget_tokens(self, context: int) -> int:
        """Top-K size for a context of ``context`` tokens (sinks and window come on top)."""
        if isinstance(self.budget, float) and self.budget <= 1.0:
            return max(1, int(round(self.budget * context)))
        return int(self.budget)


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


def forced_mask(valid: torch.Tensor, n_sink: int, window: int) -> torch.Tensor:
    """Tokens always attended: the first ``n_sink`` valid tokens and the last ``window`` positions.

    ``valid [..., N]`` marks real (non-padding, causally visible) tokens; the result is within ``valid``.
    """
    n = valid.shape[-1]
    rank = valid.long().cumsum(-1) - 1
    sink = rank < n_sink
    idx = torch.arange(n, device=valid.device)
    last_valid = torch.where(valid, idx, torch.full_like(idx, -1)).amax(-1, keepdim=True)
    win = idx > last_valid - window
    return valid & (sink | win)


def select(
    scores: torch.Tensor, valid: torch.Tensor, policy: SelectionPolicy, context: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick the tokens to attend per KV head.

    ``scores [..., N]`` approximate scores per KV head, ``valid [..., N]`` (broadcastable) real tokens.
    Returns ``indices [..., K]`` (long) and ``keep [..., K]`` (bool, False where fewer tokens exist),
    where ``K = min(N, n_sink + window + budget)``; sinks and window are always among the kept.
    """
    n = scores.shape[-1]
    valid = valid.expand_as(scores)
    context = context if context is not None else n
    k = min(n, policy.n_sink + policy.window + policy.budget_tokens(context))
    forced = forced_mask(valid, policy.n_sink, policy.window)
    s = scores.float().masked_fill(~valid, float("-inf")).masked_fill(forced, float("inf"))
    top, indices = torch.topk(s, k, dim=-1, sorted=False)
    return indices, top > float("-inf")


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
    qw = rotary.rotate_to(q_pre, centres)  # [Hq, M, P, d]
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
    from .rope import apply_rope

    q = apply_rope(q_pre.float(), cq, sq)
    k = apply_rope(keys_pre.float(), ck, sk)
    return torch.bmm(q.reshape(hkv, (hq // hkv) * m, d), k.transpose(1, 2)).reshape(hq, m, n)


def mass_recall(
    true_logits: torch.Tensor,
    approx_scores: torch.Tensor | None,
    q_pos: torch.Tensor,
    policy: SelectionPolicy,
    scale: float,
    num_kv_heads: int,
) -> torch.Tensor:
    """Attention-mass recall ``[Hq, M]``: the share of exact softmax mass carried by the selected tokens.

    ``true_logits``/``approx_scores`` ``[Hq, M, N]``; query ``m`` sees keys ``0..q_pos[m]``. The selection is
    shared by the query heads of a KV group (``policy.aggregation``). ``approx_scores=None`` selects by the
    exact logits themselves (the oracle upper bound for this budget).
    """
    hq, m, n = true_logits.shape
    valid = torch.arange(n).reshape(1, n) <= q_pos.reshape(m, 1)  # [M, N]
    probs = torch.softmax((true_logits * scale).masked_fill(~valid, float("-inf")), dim=-1)
    source = true_logits if approx_scores is None else approx_scores
    agg = group_aggregate(source.masked_fill(~valid, float("-inf")).transpose(0, 1), num_kv_heads, policy.aggregation, scale)
    recalls = []
    for i in range(m):  # the budget depends on each query's context length
        ctx = int(q_pos[i]) + 1
        idx, keep = select(agg[i], valid[i], policy, context=ctx)  # [Hkv, K]
        chosen = torch.zeros(num_kv_heads, n, dtype=torch.bool).scatter_(1, idx, keep)
        chosen = chosen.repeat_interleave(hq // num_kv_heads, 0)  # [Hq, N]
        recalls.append((probs[:, i] * chosen).sum(-1))
    return torch.stack(recalls, 1)
