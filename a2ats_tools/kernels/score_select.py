"""Approximate scores of every cached token from per-step lookup tables: the A²ATS score op.

At each decode step the (pre-RoPE) query of every head is rotated to each distance-bucket centre and dotted
with every centroid once: ``tables [B,Hkv,G',P·C]`` (:func:`build_tables`). A cached token ``j`` with code
``c_j`` is then scored by one table read at ``offsets[j] + c_j``, where ``offsets[j] = bucket(t − j)·C`` comes
from :meth:`~a2ats_tools.rope.DistanceBuckets.row_buckets`, the one bucket rule, and aggregated over the
group's query heads (:func:`score_torch`, the runtime's CPU path; :func:`score_triton` beside it). Which rows a
step then keeps is :func:`a2ats_tools.selection.select`.
"""

from __future__ import annotations

import torch

from ..rope import HALVES, RopeLayout, apply_rope
from ..scoring import group_aggregate
from ..selection import KEY_TYPES
from ._dispatch import resolve_backend, tl, triton

TRITON_AGGREGATIONS = ("sum", "max")


def build_tables(
    q_pre: torch.Tensor, codebook_t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, aggregation: str,
    dtype: torch.dtype = torch.float32, emulate_bf16: bool = False, layout: RopeLayout = HALVES,
) -> torch.Tensor:
    """Score tables ``[B,Hkv,G',P·C]`` in ``dtype`` of the step's pre-RoPE queries ``q_pre [B,Hq,d]``.

    ``codebook_t [Hkv,d,C]`` (in ``dtype``, or float32 of bf16-rounded values with ``emulate_bf16``); ``cos``/``sin
    [P,r]`` rotate a query to the ``P`` bucket centres in use, as ``layout`` pairs dimensions (a partial rotary
    embedding's ``r < d``: the other dimensions enter every bucket's score unrotated). For ``sum`` the group's queries are summed first
    (scores are linear in the query), so ``G' = 1``; otherwise ``G' = G``. ``emulate_bf16``: bf16 operands, a
    float32 product and a bf16 table, what a native bf16 product computes, on CPUs without bf16 instructions.
    """
    b, hq, d = q_pre.shape
    hkv, _, c = codebook_t.shape
    q = q_pre.float().reshape(b, hkv, hq // hkv, d)
    if aggregation == "sum":
        q = q.sum(2, keepdim=True)
    g, p = q.shape[2], cos.shape[0]
    rotated = apply_rope(q.unsqueeze(3), cos, sin, layout).transpose(0, 1)  # [Hkv, B, G', P, d]
    qw = rotated.reshape(hkv, b * g * p, d)
    if emulate_bf16:
        table = torch.bmm(qw.to(torch.bfloat16).float(), codebook_t).to(torch.bfloat16)
    else:
        table = torch.bmm(qw.to(dtype), codebook_t)  # [Hkv, B*G'*P, C]
    return table.reshape(hkv, b, g, p * c).transpose(0, 1)


def score_torch(
    tables: torch.Tensor, codes: torch.Tensor, offsets: torch.Tensor, aggregation: str, scale: float = 1.0
) -> torch.Tensor:
    """Scores ``[B,Hkv,N]`` of the first ``N = len(offsets)`` cached tokens, ``codes [B,Hkv,>=N]`` (int16/int32),
    ``offsets [N]`` int64: each token's bucket times ``C``. ``G' = 1`` tables keep their dtype (their bits are
    gathered, an integer gather); wider tables are aggregated by ``aggregation`` (``scale``: for ``softmax``)."""
    b, hkv, g, _ = tables.shape
    length = offsets.shape[0]
    index = offsets + codes[..., :length]  # [B, Hkv, N] int64: bucket * C + code, inside each row's table
    if g == 1:
        bits = tables[:, :, 0].view(KEY_TYPES[tables.element_size()])
        return bits.gather(-1, index).view(tables.dtype)
    s = tables.gather(-1, index.unsqueeze(2).expand(-1, -1, g, -1))  # [B, Hkv, G', N]
    return group_aggregate(s.reshape(b, hkv * g, length), hkv, aggregation, scale)


if triton is not None:

    @triton.jit
    def _score_kernel(
        tables_ptr,  # [B,Hkv,G',P*C] f32/bf16/f16 contiguous (read as f32)
        codes_ptr,  # [B,Hkv,Nmax] int16/int32, strided
        offsets_ptr,  # [length] int64: bucket of token j times C
        scores_ptr,  # [B,Hkv,length] f32 contiguous
        length,
        n_kv_heads,
        table_size,
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
        index = tl.load(offsets_ptr + j, mask=ok, other=0) + code
        table = tables_ptr + bh.to(tl.int64) * (GROUP * table_size)
        score = tl.load(table + index, mask=ok, other=0.0).to(tl.float32)
        for g in tl.static_range(1, GROUP):
            other = tl.load(table + g * table_size + index, mask=ok, other=0.0).to(tl.float32)
            if AGG_MAX:
                score = tl.maximum(score, other)
            else:
                score = score + other
        tl.store(scores_ptr + bh * length + j, score, mask=ok)


def score_triton(
    tables: torch.Tensor, codes: torch.Tensor, offsets: torch.Tensor, aggregation: str, block: int = 1024
) -> torch.Tensor:
    """Triton version of :func:`score_torch` (same contract, ``sum`` and ``max``; float32 scores).

    One program per (block of tokens, sequence, KV head): load codes and offsets, gather ``tables[g, offset +
    code]`` for the ``G'`` heads, aggregate, store.
    """
    if triton is None:
        raise RuntimeError("triton is not installed")
    if aggregation not in TRITON_AGGREGATIONS:
        raise ValueError(f"the Triton score kernel aggregates by {TRITON_AGGREGATIONS}, not {aggregation!r}")
    b, hkv, gp, size = tables.shape
    if tables.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        tables = tables.float()
    tables = tables.contiguous()  # half-precision tables are read as they are (no float copy)
    if codes.stride(-1) != 1:
        codes = codes.contiguous()
    length = offsets.shape[0]
    scores = torch.empty(b, hkv, length, dtype=torch.float32, device=tables.device)
    if length == 0:
        return scores
    block = max(16, min(block, triton.next_power_of_2(length)))
    grid = (triton.cdiv(length, block), b * hkv)
    _score_kernel[grid](
        tables, codes, offsets.to(device=tables.device, dtype=torch.int64).contiguous(), scores, length, hkv, size,
        codes.stride(0), codes.stride(1), GROUP=gp, AGG_MAX=aggregation == "max", BLOCK=block,
    )
    return scores


def score(
    tables: torch.Tensor, codes: torch.Tensor, offsets: torch.Tensor, aggregation: str, scale: float = 1.0,
    backend: str = "auto",
) -> torch.Tensor:
    """:func:`score_torch` or, for ``auto`` on CUDA tensors (``sum``/``max``), :func:`score_triton`."""
    if aggregation in TRITON_AGGREGATIONS and resolve_backend(backend, tables, codes) == "triton":
        return score_triton(tables, codes, offsets, aggregation)
    return score_torch(tables, codes, offsets, aggregation, scale)
