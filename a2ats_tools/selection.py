"""What a decode step keeps: the one definition of A²ATS token selection.

Per sample and KV head, a step keeps the first ``n_sink`` real rows (sinks), the last ``window`` real rows (the
local window) and ``top`` more rows, the budget rule's share of the sample's real rows (:func:`top_k`); padding is
never kept. The ``top`` rows are the best by approximate score or, with re-ranking (``rerank`` > 0 and an ``exact``
callback), the best by exact score among the ``ceil(rerank * top)`` best by approximate score, the group's exact
logits aggregated by ``rerank_aggregation``.

The runtime's selectors, the evaluation's recall curve and the conversion report all call :func:`select`; the
fused CPU kernel (``kernels/cpu_decode``) and the Triton score kernel are tested against it. ``settings`` is
anything with the fields of :class:`~a2ats_tools.runtime.settings.RuntimeSettings` that selection reads
(``budget``, ``n_sink``, ``window``, ``rerank``, ``rerank_aggregation``), which owns their defaults.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from .scoring import group_aggregate

NEG_INF = float("-inf")
POS_INF = float("inf")
KEY_TYPES = {2: torch.int16, 4: torch.int32, 8: torch.int64}  # rank_keys: an integer type per float width


def top_k(context: torch.Tensor | int, budget: float | int) -> torch.Tensor | int:
    """The budget rule: rows picked on top of sinks and window for ``context`` real rows (an int, or ``[B]``).

    A fraction in (0, 1] takes ``max(1, round(budget * context))`` (round half to even); a token count is itself.
    """
    fraction = isinstance(budget, float) and budget <= 1.0
    if isinstance(context, int):
        return max(1, int(round(budget * context))) if fraction else int(budget)
    if fraction:
        return (context.double() * budget).round().long().clamp_min(1)
    return torch.full_like(context, int(budget))


def kept_rows(context: torch.Tensor | int, top: torch.Tensor | int, n_sink: int, window: int) -> torch.Tensor | int:
    """Rows one sample keeps per KV head: sinks, window and ``top`` more, never more than its ``context`` rows."""
    if isinstance(context, int) and isinstance(top, int):
        return min(context, top + n_sink + window)
    return torch.minimum(torch.as_tensor(context), torch.as_tensor(top) + n_sink + window)


def forced_rows(valid: torch.Tensor, n_sink: int, window: int) -> torch.Tensor:
    """``[..., N]``: the rows always kept, the first ``n_sink`` and the last ``window`` real rows (within ``valid``,
    which marks real rows: left padding, or a causal prefix)."""
    n = valid.shape[-1]
    rank = valid.long().cumsum(-1) - 1
    idx = torch.arange(n, device=valid.device)
    last = torch.where(valid, idx, torch.full_like(idx, -1)).amax(-1, keepdim=True)
    return valid & ((rank < n_sink) | (idx > last - window))


class StepBudget(NamedTuple):
    """What selection derives from the real rows alone (``valid [B, N]``): the same for every layer of a step."""

    rows: torch.Tensor  # [B] rows each sample keeps
    top: torch.Tensor  # [B] the top-K part of them
    k: int  # rows of the sample that keeps most
    forced: torch.Tensor | None  # [B, 1, N] sinks and window; None without padding (they are then plain slices)
    uniform_top: int | None  # every sample's top-K when there is no padding, else None
    covers_all: bool  # sinks + window + top-K reach every real row of every sample
    suffix: tuple[torch.Tensor, torch.Tensor] | None  # (first real row [B], top [B]) int64 when real rows are a suffix


def step_budget(valid: torch.Tensor, settings: Any) -> StepBudget:
    """The :class:`StepBudget` of ``valid [B, N]`` under ``settings``."""
    length = valid.shape[-1]
    context = valid.sum(-1)
    top = top_k(context, settings.budget)
    rows = kept_rows(context, top, settings.n_sink, settings.window)
    unpadded = bool(valid.all())
    forced = None if unpadded else forced_rows(valid, settings.n_sink, settings.window)[:, None, :]
    covers_all = bool((rows >= context).all())
    if unpadded:
        first = torch.zeros(valid.shape[0], dtype=torch.int64)
    elif bool((valid[:, 1:] >= valid[:, :-1]).all()):  # False then True: left padding
        first = (length - context).to(torch.int64).contiguous()
    else:
        first = None
    suffix = None if first is None else (first, top.to(torch.int64).contiguous())
    return StepBudget(rows, top, int(rows.max()), forced, int(top.max()) if unpadded else None, covers_all, suffix)


class Selection(NamedTuple):
    """Rows to attend per sample and KV head: ``indices [B, Hkv, K]`` (long), ``keep [B, Hkv, K]`` (False past a
    sample's own budget), and ``logits [B, Hkv, G, K]``, the exact logits of those rows when re-ranking computed
    them (so attention need not gather their keys again), else None."""

    indices: torch.Tensor
    keep: torch.Tensor
    logits: torch.Tensor | None = None


ExactLogits = Callable[[torch.Tensor], torch.Tensor]  # candidate rows [B, Hkv, K] -> float32 logits [B, Hkv, G, K]


def select(
    scores: torch.Tensor,
    valid: torch.Tensor,
    settings: Any,
    *,
    budget: StepBudget | None = None,
    exact: ExactLogits | None = None,
    scale: float = 1.0,
) -> Selection:
    """The rows a step keeps, from approximate ``scores [B, Hkv, N]`` (higher is better) and ``valid [B, N]``.

    ``budget``: :func:`step_budget` of ``valid`` when the caller shares it between layers. ``exact``: computes the
    exact logits of candidate rows; with it and ``settings.rerank`` > 0 the approximate top-K is re-ranked
    exactly. ``scale`` is the attention's softmax scale (for ``rerank_aggregation="softmax"``). The kept rows come
    in ascending order without re-ranking.
    """
    b = budget if budget is not None else step_budget(valid, settings)
    length = scores.shape[-1]
    s, high, low = rank_keys(scores)  # a new tensor: modified in place
    if b.forced is None:  # no padding: sinks are the first rows, the window the last ones
        s[..., : settings.n_sink] = high
        s[..., max(0, length - settings.window) :] = high
    else:
        s = s.masked_fill(~valid[:, None, :], low).masked_fill(b.forced, high)
    if exact is not None and settings.rerank and b.k < length:
        if b.uniform_top is not None:
            return _rerank_uniform(s, high, b.k, b.uniform_top, length, exact, settings, scale)
        return rerank(s, high, low, b.rows, b.top, exact, settings, scale)
    uniform = b.rows.numel() == 1 or bool((b.rows == b.k).all())  # same budget everywhere: no order needed
    vals, indices = torch.topk(s, b.k, dim=-1, sorted=not uniform)
    keep = vals > low
    if not uniform:
        keep &= torch.arange(b.k, device=s.device) < b.rows[:, None, None]
    indices, order = indices.sort(-1)  # ascending rows: the K/V gathers walk memory forward
    return Selection(indices, keep.gather(-1, order))


def rerank(
    s: torch.Tensor, high: int, low: int, rows: torch.Tensor, top: torch.Tensor, exact: ExactLogits, settings: Any,
    scale: float,
) -> Selection:
    """Over-fetch ``rerank``·top-K candidates by the ranking keys ``s`` (:func:`rank_keys`, ``high`` on forced rows,
    ``low`` on padding) and keep each sample's ``rows`` best by exact score (for ``softmax``, each head's softmax
    over the sample's live candidates)."""
    extra = (top.double() * settings.rerank).ceil().long()
    fetch = torch.minimum(rows - top + extra, (s > low).sum(-1).amax(-1))
    k2 = max(int(fetch.max()), int(rows.max()))
    vals, cand = torch.topk(s, k2, dim=-1, sorted=True)
    live = (torch.arange(k2, device=s.device) < fetch[:, None, None]) & (vals > low)
    logits = exact(cand).masked_fill(~live[:, :, None, :], NEG_INF)  # a softmax normalises over live rows only
    scores = _group_scores(logits, settings.rerank_aggregation, scale)
    scores = scores.masked_fill(vals == high, POS_INF).masked_fill(~live, NEG_INF)
    k = int(rows.max())
    v2, pick = torch.topk(scores, k, dim=-1, sorted=True)
    keep = (torch.arange(k, device=s.device) < rows[:, None, None]) & (v2 > NEG_INF)
    return Selection(cand.gather(-1, pick), keep)


def _rerank_uniform(
    s: torch.Tensor, high: int, k: int, top: int, length: int, exact: ExactLogits, settings: Any, scale: float
) -> Selection:
    """:func:`rerank` when every sample has the same budget and no padding (the common case): no ordering or
    masking is needed, and the exact logits of the kept rows come back with them."""
    fetch = min(length, k - top + math.ceil(top * settings.rerank))
    vals, cand = torch.topk(s, fetch, dim=-1, sorted=False)
    logits = exact(cand)  # [B, Hkv, G, fetch]
    scores = _group_scores(logits, settings.rerank_aggregation, scale, finite=True)
    scores.masked_fill_(vals == high, POS_INF)  # sinks and window stay
    pick = torch.topk(scores, k, dim=-1, sorted=False).indices
    kept_logits = logits.gather(-1, pick.unsqueeze(2).expand(-1, -1, logits.shape[2], -1))
    return Selection(cand.gather(-1, pick), torch.ones_like(pick, dtype=torch.bool), kept_logits)


def _group_scores(logits: torch.Tensor, how: str, scale: float, finite: bool = False) -> torch.Tensor:
    """Candidates' exact logits ``[B, Hkv, G, K]`` -> one score per KV head ``[B, Hkv, K]`` (``finite``: none masked)."""
    b, h, g, k = logits.shape
    return group_aggregate(logits.reshape(b, h * g, k), h, how, scale, finite=finite)


def rank_keys(scores: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """Floating scores -> ``(keys, high, low)``: integers of the same width whose order is the scores' order
    (IEEE bits, negatives flipped), plus two sentinels above and below every score's key (kept / never kept).

    ``topk`` over these keys picks the same rows as over the scores, faster (integer compares, and a bf16 table
    keeps 16-bit keys). ``-inf`` and ``+inf`` scores stay strictly between the sentinels.
    """
    if not scores.is_floating_point():  # a selector's integer or boolean scores
        scores = scores.float()
    int_type = KEY_TYPES[scores.element_size()]
    info = torch.iinfo(int_type)
    bits = scores.contiguous().view(int_type)
    keys = bits ^ ((bits >> (info.bits - 1)) & info.max)  # negative floats: reverse their order
    return keys, info.max, info.min


def chosen_mask(selection: Selection, length: int) -> torch.Tensor:
    """``[B, Hkv, length]`` bool: the rows ``selection`` keeps."""
    b, h, _ = selection.indices.shape
    mask = torch.zeros(b, h, length, dtype=torch.bool, device=selection.indices.device)
    return mask.scatter_(-1, selection.indices, selection.keep)
