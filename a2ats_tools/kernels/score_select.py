"""Approximate scores of every cached token from per-step lookup tables, and the top-K selection.

At each decode step the (pre-RoPE) query of every head is rotated to each distance-bucket centre and dotted
with every centroid once: ``tables [B,Hkv,G',P,C]``. A cached token ``j`` with code ``c_j`` is then scored by
one table read at ``(bucket(t − j), c_j)``, aggregated over the group's query heads. Sinks and the local
window get ``+inf`` (always selected), left padding ``−inf`` (never kept) — the semantics of
:func:`a2ats_tools.scoring.select`.
"""

from __future__ import annotations

import math

import torch

from ._dispatch import resolve_backend, tl, triton  # noqa: F401

AGGREGATIONS = ("sum", "max")


def _check_aggregation(aggregation: str) -> None:
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"kernel aggregation must be one of {AGGREGATIONS}, not {aggregation!r}")


def build_tables_torch(
    q_pre: torch.Tensor, codebook: torch.Tensor, rotations: torch.Tensor, aggregation: str
) -> torch.Tensor:
    """Lookup tables ``[B,Hkv,G',P,C]`` (float32) of the step's pre-RoPE queries ``q_pre [B,Hq,d]``.

    ``rotations[p]`` rotates a row vector to bucket centre ``p`` (``q @ rotations[p]``). For ``sum`` the
    group's queries are summed first (scores are linear in the query), so ``G' = 1``; for ``max`` ``G' = G``.
    """
    _check_aggregation(aggregation)
    b, hq, d = q_pre.shape
    hkv, c, _ = codebook.shape
    q = q_pre.float().reshape(b, hkv, hq // hkv, d)
    if aggregation == "sum":
        q = q.sum(2, keepdim=True)
    gp = q.shape[2]
    p = rotations.shape[0]
    rotated = torch.einsum("bhgd,pde->hbgpe", q, rotations.float())  # [Hkv,B,G',P,d]
    rows = rotated.reshape(hkv, b * gp * p, d)
    tables = torch.bmm(rows, codebook.float().transpose(1, 2))  # [Hkv, B*G'*P, C]
    return tables.reshape(hkv, b, gp, p, c).transpose(0, 1).contiguous()


def bucket_indices(
    length: int, buckets: int, bucket_start: float, bucket_ratio: float, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Bucket (long ``[length]``) of each token ``j`` seen from ``t = length − 1``: the bucket of ``t − j``.

    The same float32 arithmetic as :meth:`a2ats_tools.rope.DistanceBuckets.bucket_of`.
    """
    if buckets <= 1:
        return torch.zeros(length, dtype=torch.long, device=device)
    dist = torch.arange(length - 1, -1, -1, device=device).float().clamp_min(bucket_start)
    b = torch.floor(torch.log(dist / bucket_start) / math.log(bucket_ratio) + 1e-6).long()
    return b.clamp_(0, buckets - 1)


def _forced_and_padding(
    length: int, first_valid: torch.Tensor, n_sink: int, window: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``forced [B,L]`` (sinks and window) and ``padding [B,L]`` masks."""
    j = torch.arange(length, device=first_valid.device).unsqueeze(0)
    fv = first_valid.long().unsqueeze(1)
    padding = j < fv
    forced = (j < fv + n_sink) | (j >= length - window)
    return forced, padding


def score_torch(
    tables: torch.Tensor,
    codes: torch.Tensor,
    length: int,
    first_valid: torch.Tensor,
    n_sink: int,
    window: int,
    bucket_start: float,
    bucket_ratio: float,
    aggregation: str,
) -> torch.Tensor:
    """Scores ``[B,Hkv,length]`` (float32) of the first ``length`` cached tokens (codes ``[B,Hkv,Nmax]``).

    ``+inf`` on sinks (``first_valid ≤ j < first_valid + n_sink``) and the window (``j ≥ length − window``),
    ``−inf`` on left padding (``j < first_valid``).
    """
    _check_aggregation(aggregation)
    b, hkv, gp, p, c = tables.shape
    flat = tables.reshape(b, hkv, gp, p * c)
    offset = bucket_indices(length, p, bucket_start, bucket_ratio, tables.device) * c  # [L]
    index = codes[..., :length].long() + offset  # [B,Hkv,L]
    if gp == 1:
        scores = flat[:, :, 0].gather(-1, index)
    else:
        per_head = flat.gather(-1, index.unsqueeze(2).expand(b, hkv, gp, length))
        scores = per_head.sum(2) if aggregation == "sum" else per_head.amax(2)
    forced, padding = _forced_and_padding(length, first_valid, n_sink, window)
    scores.masked_fill_(forced.unsqueeze(1), float("inf"))
    return scores.masked_fill_(padding.unsqueeze(1), float("-inf"))


def score_triton(
    tables: torch.Tensor,
    codes: torch.Tensor,
    length: int,
    first_valid: torch.Tensor,
    n_sink: int,
    window: int,
    bucket_start: float,
    bucket_ratio: float,
    aggregation: str,
) -> torch.Tensor:
    """Triton version of :func:`score_torch` (same contract)."""
    raise NotImplementedError("triton score kernel not implemented yet")


def select_topk(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` best tokens per KV head: ``indices [B,Hkv,k]`` (int64, unsorted) and ``keep`` (score > −inf).

    ``k`` is clipped to the number of scored tokens.
    """
    values, indices = torch.topk(scores, min(k, scores.shape[-1]), dim=-1, sorted=False)
    return indices, values > float("-inf")


def score_select(
    tables: torch.Tensor,
    codes: torch.Tensor,
    length: int,
    first_valid: torch.Tensor,
    n_sink: int,
    window: int,
    bucket_start: float,
    bucket_ratio: float,
    aggregation: str,
    k: int,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Score every cached token and select the top ``k`` per KV head -> ``(indices, keep)``."""
    score = score_triton if resolve_backend(backend, tables, codes) == "triton" else score_torch
    scores = score(
        tables, codes, length, first_valid, n_sink, window, bucket_start, bucket_ratio, aggregation
    )
    return select_topk(scores, k)
