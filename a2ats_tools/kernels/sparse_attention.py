"""Exact decode attention over the selected rows of the KV cache (GQA, one query token per sequence).

Query head ``h·G + g`` attends over KV head ``h``'s rows ``indices[b, h]`` (those with ``keep``), with an
ordinary softmax in float32. Attending to every cached row reproduces dense attention exactly.
"""

from __future__ import annotations

import torch

from ..exact_attention import softcap_logits
from ._dispatch import resolve_backend, tl, triton


def gather_rows(buffer: torch.Tensor, indices: torch.Tensor, device: torch.device | None = None) -> torch.Tensor:
    """``buffer [B, Hkv, cap, d]`` rows at ``indices [B, Hkv, K]`` -> ``[B, Hkv, K, d]`` on ``device`` (default:
    the buffer's).

    One ``index_select`` over the buffer's rows (many times faster than ``gather`` with an expanded index), zero
    copy when rows are packed (a slice of a larger preallocated cache is fine). When the buffer lives on the host
    (offload), the gather runs there and only the selected rows move. A buffer that is not a tensor (a paged
    cache's rows, :class:`~a2ats_tools.serving.paged.PagedRows`) gathers its own rows.
    """
    if not isinstance(buffer, torch.Tensor):
        return buffer.gather_rows(indices, device)
    b, h, n, d = buffer.shape
    s0, s1, s2, s3 = buffer.stride()
    if not (s3 == 1 and s2 == d and s1 % d == 0 and s0 % d == 0):
        buffer = buffer.contiguous()
        s0, s1, s2 = buffer.stride()[:3]
    count = ((b - 1) * s0 + (h - 1) * s1) // d + n
    rows = buffer.as_strided((count, d), (d, 1))
    idx = indices.to(buffer.device)
    first = torch.arange(b, device=buffer.device).view(b, 1, 1) * (s0 // d)
    first = first + torch.arange(h, device=buffer.device).view(1, h, 1) * (s1 // d)
    picked = rows.index_select(0, (idx + first).reshape(-1)).view(*idx.shape, d)
    return picked if device is None else picked.to(device, non_blocking=True)


def sparse_decode_torch(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    indices: torch.Tensor,
    keep: torch.Tensor,
    scale: float,
    logits: torch.Tensor | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """``out [B,Hq,d]`` (``q``'s dtype) of RoPE'd ``q [B,Hq,d]`` over ``k_cache/v_cache [B,Hkv,Nmax,d]``, accumulated
    in float32 whatever the K/V dtype (the runtime's CPU path; K/V may live on the host). ``softcap``: the
    model's cap on scaled logits (Gemma 2), applied as its own attention applies it.

    ``indices [B,Hkv,K]`` (int64) select rows; entries with ``keep = False`` are ignored (their index must still
    lie in ``[0, Nmax)``). A head with nothing kept outputs zeros. ``logits [B,Hkv,G,K]`` (unscaled float32
    ``q · k`` of those rows, e.g. left by exact re-ranking) spares the key gather and product; the result is the
    same.
    """
    b, hq, d = q.shape
    hkv = indices.shape[1]
    v = gather_rows(v_cache, indices, q.device).float()
    if logits is None:  # float32 products, as the re-ranking's logits are: the same numerics either way
        k = gather_rows(k_cache, indices, q.device).float()  # [B, Hkv, K, d]
        logits = q.float().reshape(b, hkv, hq // hkv, d) @ k.transpose(-1, -2)  # [B, Hkv, G, K]
    logits = softcap_logits(logits * scale, softcap)
    masked = not bool(keep.all())
    if masked:
        logits = logits.masked_fill(~keep[:, :, None, :], float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if masked:
        probs = probs.nan_to_num_(0.0)  # a head with nothing kept
    return (probs @ v).reshape(b, hq, v.shape[-1]).to(q.dtype)


if triton is not None:

    @triton.jit
    def _sparse_decode_split_kernel(
        q_ptr,  # [B,Hq,d] strided (last dim contiguous)
        k_ptr,  # [B,Hkv,Nmax,d] strided (last dim contiguous)
        v_ptr,
        indices_ptr,  # [B,Hkv,K] int64 contiguous
        keep_ptr,  # [B,Hkv,K] int8 contiguous
        m_ptr,  # [B*Hkv, S, GP] f32: running max of each split
        l_ptr,  # [B*Hkv, S, GP] f32: softmax denominator
        acc_ptr,  # [B*Hkv, S, GP, D] f32: unnormalised output
        n_kv_heads,
        group,
        head_dim,
        n_selected,
        per_split,
        n_splits,
        scale,
        stride_qb,
        stride_qh,
        stride_kb,
        stride_kh,
        stride_kn,
        stride_vb,
        stride_vh,
        stride_vn,
        GP: tl.constexpr,
        D: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        bh = tl.program_id(0)
        split = tl.program_id(1)
        b = (bh // n_kv_heads).to(tl.int64)  # 64-bit offsets into large caches
        h = bh % n_kv_heads
        heads = tl.arange(0, GP)
        dims = tl.arange(0, D)
        head_ok = heads < group
        dim_ok = dims < head_dim
        q = tl.load(
            q_ptr + b * stride_qb + (h * group + heads[:, None]) * stride_qh + dims[None, :],
            mask=head_ok[:, None] & dim_ok[None, :],
            other=0.0,
        ).to(tl.float32)
        q = q * scale
        m = tl.full((GP,), float("-inf"), tl.float32)
        den = tl.zeros((GP,), tl.float32)
        acc = tl.zeros((GP, D), tl.float32)
        k_base = k_ptr + b * stride_kb + h * stride_kh
        v_base = v_ptr + b * stride_vb + h * stride_vh
        start = split * per_split
        stop = tl.minimum(start + per_split, n_selected)
        for k0 in range(start, stop, BLOCK_K):
            sel = k0 + tl.arange(0, BLOCK_K)
            sel_ok = sel < stop
            row = tl.load(indices_ptr + bh.to(tl.int64) * n_selected + sel, mask=sel_ok, other=0)
            kept = tl.load(keep_ptr + bh.to(tl.int64) * n_selected + sel, mask=sel_ok, other=0) != 0
            kept = kept & sel_ok
            rmask = kept[:, None] & dim_ok[None, :]
            keys = tl.load(k_base + row[:, None] * stride_kn + dims[None, :], mask=rmask, other=0.0).to(
                tl.float32
            )
            vals = tl.load(v_base + row[:, None] * stride_vn + dims[None, :], mask=rmask, other=0.0).to(
                tl.float32
            )
            logits = tl.sum(q[:, None, :] * keys[None, :, :], axis=2)  # [GP, BLOCK_K]
            logits = tl.where(kept[None, :], logits, float("-inf"))
            m_new = tl.maximum(m, tl.max(logits, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m - m_safe)
            prob = tl.exp(logits - m_safe[:, None])
            den = den * alpha + tl.sum(prob, axis=1)
            acc = acc * alpha[:, None] + tl.sum(prob[:, :, None] * vals[None, :, :], axis=1)
            m = m_new
        part = bh.to(tl.int64) * n_splits + split
        tl.store(m_ptr + part * GP + heads, m)
        tl.store(l_ptr + part * GP + heads, den)
        tl.store(acc_ptr + (part * GP + heads[:, None]) * D + dims[None, :], acc)

    @triton.jit
    def _sparse_decode_reduce_kernel(
        m_ptr,
        l_ptr,
        acc_ptr,
        out_ptr,  # [B,Hq,d] contiguous, q's dtype
        group,
        head_dim,
        n_splits,
        GP: tl.constexpr,
        D: tl.constexpr,
        SP: tl.constexpr,
    ):
        bh = tl.program_id(0)
        g = tl.program_id(1)
        splits = tl.arange(0, SP)
        dims = tl.arange(0, D)
        split_ok = splits < n_splits
        part = bh.to(tl.int64) * n_splits + splits
        m = tl.load(m_ptr + part * GP + g, mask=split_ok, other=float("-inf"))
        den = tl.load(l_ptr + part * GP + g, mask=split_ok, other=0.0)
        acc = tl.load(
            acc_ptr + (part[:, None] * GP + g) * D + dims[None, :], mask=split_ok[:, None], other=0.0
        )
        m_all = tl.max(m, axis=0)
        m_all = tl.where(m_all == float("-inf"), 0.0, m_all)
        weight = tl.exp(m - m_all)  # 0 for empty splits
        total = tl.sum(weight * den, axis=0)
        out = tl.sum(weight[:, None] * acc, axis=0) / tl.where(total > 0.0, total, 1.0)
        dst = out_ptr + (bh.to(tl.int64) * group + g) * head_dim + dims
        tl.store(dst, out.to(out_ptr.dtype.element_ty), mask=dims < head_dim)


def _split_count(n_selected: int, programs: int, block_k: int, target_programs: int = 264) -> int:
    """Splits of the K selected rows: enough programs to fill a large GPU, at least one block each."""
    blocks = triton.cdiv(max(n_selected, 1), block_k)
    return max(1, min(blocks, triton.cdiv(target_programs, programs)))


def sparse_decode_triton(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    indices: torch.Tensor,
    keep: torch.Tensor,
    scale: float,
    block_k: int | None = None,
    splits: int | None = None,
) -> torch.Tensor:
    """Triton version of :func:`sparse_decode_torch` (same contract).

    Flash-decoding: a grid over (sequence·KV head, split of the K selected rows); each program serves the
    group's ``G`` query heads, gathers K/V rows through the indices, and keeps an online softmax
    ``(max, sum, acc)``, written per split; a second kernel combines the splits. ``splits`` defaults to
    enough programs (~264) to fill a large GPU, each split at least ``block_k`` rows. ``block_k`` (32, or 16
    for wide groups/heads) and the warp count keep the ``[G, block_k, d]`` products in registers without
    spilling (checked with ptxas for sm_90 up to G = 16, d = 128).
    """
    if triton is None:
        raise RuntimeError("triton is not installed")
    b, hq, d = q.shape
    hkv, n_sel = k_cache.shape[1], indices.shape[-1]
    group = hq // hkv
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k_cache.stride(-1) != 1:
        k_cache = k_cache.contiguous()
    if v_cache.stride(-1) != 1:
        v_cache = v_cache.contiguous()
    if v_cache.shape[-1] != d:
        raise ValueError("sparse_decode_triton needs equal key and value head dims")
    indices = indices.to(torch.long).contiguous()
    keep = keep.to(torch.int8).contiguous()
    gp = triton.next_power_of_2(group)
    dpad = triton.next_power_of_2(d)
    block_k = block_k or (32 if gp * dpad * 32 <= 8192 else 16)
    num_warps = 4 if gp * dpad * block_k <= 8192 else 8
    splits = splits or _split_count(n_sel, b * hkv, block_k)
    per_split = triton.cdiv(triton.cdiv(max(n_sel, 1), splits), block_k) * block_k
    splits = triton.cdiv(max(n_sel, 1), per_split)
    m = torch.empty(b * hkv, splits, gp, dtype=torch.float32, device=q.device)
    den = torch.empty_like(m)
    acc = torch.empty(b * hkv, splits, gp, dpad, dtype=torch.float32, device=q.device)
    _sparse_decode_split_kernel[(b * hkv, splits)](
        q,
        k_cache,
        v_cache,
        indices,
        keep,
        m,
        den,
        acc,
        hkv,
        group,
        d,
        n_sel,
        per_split,
        splits,
        float(scale),
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        GP=gp,
        D=dpad,
        BLOCK_K=block_k,
        num_warps=num_warps,
    )
    out = torch.empty(b, hq, d, dtype=q.dtype, device=q.device)
    _sparse_decode_reduce_kernel[(b * hkv, group)](
        m, den, acc, out, group, d, splits, GP=gp, D=dpad, SP=triton.next_power_of_2(splits)
    )
    return out


def sparse_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    indices: torch.Tensor,
    keep: torch.Tensor,
    scale: float,
    backend: str = "auto",
) -> torch.Tensor:
    """Sparse decode attention; ``auto`` runs Triton on CUDA tensors and torch otherwise."""
    if resolve_backend(backend, q, k_cache) == "triton":
        return sparse_decode_triton(q, k_cache, v_cache, indices, keep, scale)
    return sparse_decode_torch(q, k_cache, v_cache, indices, keep, scale)
