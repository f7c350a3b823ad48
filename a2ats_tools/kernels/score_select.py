"""Approximate scores of every cached token from per-step lookup tables, and the top-K selection.

At each decode step the (pre-RoPE) query of every head is rotated to each distance-bucket centre and dotted
with every centroid once: ``tables [B,Hkv,G',P,C]``. A cached token ``j`` with code ``c_j`` is then scored by
one table read at ``(bucket(t − j), c_j)``, aggregated over the group's query heads. Sinks and the local
window get ``+inf`` (always selected), left padding ``−inf`` (never kept) — the semantics of
:func:`a2ats_tools.scoring.select`.
"""

from __future__ import annotations

import torch

from ..rope import DistanceBuckets
from ._dispatch import resolve_backend, tl, triton

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


def _mask_forced_and_padding(
    scores: torch.Tensor, first_valid: torch.Tensor, n_sink: int, window: int
) -> torch.Tensor:
    """In place on ``scores [B,Hkv,L]``: ``+inf`` on sinks and window, then ``−inf`` on left padding.

    Only the window slice and the prefix up to the last sink are touched (no full ``[B,L]`` masks).
    """
    length = scores.shape[-1]
    if window > 0:
        scores[..., max(0, length - window) :] = float("inf")
    prefix = min(length, int(first_valid.max()) + n_sink) if first_valid.numel() else 0
    if prefix > 0:
        j = torch.arange(prefix, device=scores.device).unsqueeze(0)
        fv = first_valid.to(scores.device).long().unsqueeze(1)
        head = scores[..., :prefix]
        head.masked_fill_(((j >= fv) & (j < fv + n_sink)).unsqueeze(1), float("inf"))
        head.masked_fill_((j < fv).unsqueeze(1), float("-inf"))
    return scores


def score_torch(
    tables: torch.Tensor,
    codes: torch.Tensor,
    length: int,
    first_valid: torch.Tensor,
    n_sink: int,
    window: int,
    buckets: DistanceBuckets,
    aggregation: str,
) -> torch.Tensor:
    """Scores ``[B,Hkv,length]`` (float32) of the first ``length`` cached tokens (codes ``[B,Hkv,Nmax]``).

    ``+inf`` on sinks (``first_valid ≤ j < first_valid + n_sink``) and the window (``j ≥ length − window``),
    ``−inf`` on left padding (``j < first_valid``). One gather from the flattened ``[P·C]`` table per head
    at ``bucket·C + code`` (index math in int32).
    """
    _check_aggregation(aggregation)
    b, hkv, gp, p, c = tables.shape
    flat = tables.float().reshape(b, hkv, gp, p * c)
    offset = buckets.row_buckets(length, tables.device).to(torch.int32) * c
    index = (codes[..., :length].to(torch.int32) + offset).long()  # [B,Hkv,L]
    if gp == 1:
        scores = flat[:, :, 0].gather(-1, index)
    else:
        per_head = flat.gather(-1, index.unsqueeze(2).expand(b, hkv, gp, length))
        scores = per_head.sum(2) if aggregation == "sum" else per_head.amax(2)
    return _mask_forced_and_padding(scores, first_valid, n_sink, window)


if triton is not None:

    @triton.jit
    def _score_kernel(
        tables_ptr,  # [B,Hkv,G',P,C] f32/bf16/f16 contiguous (read as f32)
        codes_ptr,  # [B,Hkv,Nmax] int16/int32, strided
        buckets_ptr,  # [length] int32: bucket of token j
        first_valid_ptr,  # [B] int64
        scores_ptr,  # [B,Hkv,length] f32 contiguous
        length,
        n_kv_heads,
        n_codes,
        n_buckets,
        n_sink,
        window,
        stride_cb,
        stride_ch,
        GROUP: tl.constexpr,
        AGG_MAX: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        pid = tl.program_id(0)
        bh = tl.program_id(1)
        b = (bh // n_kv_heads).to(tl.int64)  # 64-bit offsets into large caches
        h = bh % n_kv_heads
        j = pid * BLOCK + tl.arange(0, BLOCK)
        ok = j < length
        code = tl.load(codes_ptr + b * stride_cb + h * stride_ch + j, mask=ok, other=0).to(tl.int32)
        bucket = tl.load(buckets_ptr + j, mask=ok, other=0)
        table = tables_ptr + bh.to(tl.int64) * (GROUP * n_buckets * n_codes)
        index = bucket * n_codes + code
        score = tl.load(table + index, mask=ok, other=0.0).to(tl.float32)
        for g in tl.static_range(1, GROUP):
            other = tl.load(table + g * n_buckets * n_codes + index, mask=ok, other=0.0).to(tl.float32)
            if AGG_MAX:
                score = tl.maximum(score, other)
            else:
                score = score + other
        first = tl.load(first_valid_ptr + b).to(tl.int32)
        forced = (j < first + n_sink) | (j >= length - window)
        score = tl.where(forced, float("inf"), score)
        score = tl.where(j < first, float("-inf"), score)
        tl.store(scores_ptr + bh * length + j, score, mask=ok)


def score_triton(
    tables: torch.Tensor,
    codes: torch.Tensor,
    length: int,
    first_valid: torch.Tensor,
    n_sink: int,
    window: int,
    buckets: DistanceBuckets,
    aggregation: str,
    block: int = 1024,
) -> torch.Tensor:
    """Triton version of :func:`score_torch` (same contract).

    One program per (block of tokens, sequence, KV head): load codes, look up each token's bucket (a
    ``[length]`` int32 table from :meth:`~a2ats_tools.rope.DistanceBuckets.row_buckets`, the one bucket rule),
    gather ``tables[g, bucket, code]`` for the ``G'`` heads, aggregate, mask, store.
    """
    if triton is None:
        raise RuntimeError("triton is not installed")
    _check_aggregation(aggregation)
    b, hkv, gp, p, c = tables.shape
    if tables.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        tables = tables.float()
    tables = tables.contiguous()  # half-precision tables are read as they are (no float copy)
    if codes.stride(-1) != 1:
        codes = codes.contiguous()
    scores = torch.empty(b, hkv, length, dtype=torch.float32, device=tables.device)
    if length == 0:
        return scores
    row_buckets = buckets.row_buckets(length, tables.device).to(torch.int32)
    block = max(16, min(block, triton.next_power_of_2(length)))
    grid = (triton.cdiv(length, block), b * hkv)
    _score_kernel[grid](
        tables,
        codes,
        row_buckets,
        first_valid.to(device=tables.device, dtype=torch.long).contiguous(),
        scores,
        length,
        hkv,
        c,
        p,
        n_sink,
        window,
        codes.stride(0),
        codes.stride(1),
        GROUP=gp,
        AGG_MAX=aggregation == "max",
        BLOCK=block,
    )
    return scores


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
    buckets: DistanceBuckets,
    aggregation: str,
    k: int,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Score every cached token and select the top ``k`` per KV head -> ``(indices, keep)``."""
    score = score_triton if resolve_backend(backend, tables, codes) == "triton" else score_torch
    scores = score(
        tables, codes, length, first_valid, n_sink, window, buckets, aggregation
    )
    return select_topk(scores, k)
