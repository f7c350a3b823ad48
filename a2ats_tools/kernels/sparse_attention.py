"""Exact decode attention over the selected rows of the KV cache (GQA, one query token per sequence).

Query head ``h·G + g`` attends over KV head ``h``'s rows ``indices[b, h]`` (those with ``keep``), with an
ordinary softmax in float32. Attending to every cached row reproduces dense attention exactly.
"""

from __future__ import annotations

import torch

from ._dispatch import resolve_backend, tl, triton  # noqa: F401


def sparse_decode_torch(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    indices: torch.Tensor,
    keep: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """``out [B,Hq,d]`` (``q``'s dtype) of RoPE'd ``q [B,Hq,d]`` over ``k_cache/v_cache [B,Hkv,Nmax,d]``.

    ``indices [B,Hkv,K]`` (int64) select rows; entries with ``keep = False`` are ignored (their index may be
    anything in ``[0, Nmax)``). A head with nothing kept outputs zeros.
    """
    b, hq, d = q.shape
    hkv = k_cache.shape[1]
    dv = v_cache.shape[-1]
    rows = indices.unsqueeze(-1)
    k = k_cache.gather(2, rows.expand(-1, -1, -1, d)).float()  # [B,Hkv,K,d]
    v = v_cache.gather(2, rows.expand(-1, -1, -1, dv)).float()
    qg = q.float().reshape(b, hkv, hq // hkv, d)
    logits = torch.matmul(qg, k.transpose(-1, -2)) * scale  # [B,Hkv,G,K]
    logits.masked_fill_(~keep.unsqueeze(2), float("-inf"))
    probs = torch.softmax(logits, dim=-1).nan_to_num_(0.0)
    return torch.matmul(probs, v).reshape(b, hq, dv).to(q.dtype)


def sparse_decode_triton(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    indices: torch.Tensor,
    keep: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Triton version of :func:`sparse_decode_torch` (same contract)."""
    raise NotImplementedError("triton sparse decode kernel not implemented yet")


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
