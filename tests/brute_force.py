"""Brute-force definitions the kernels' tests check the torch versions against (used only by tests)."""

from __future__ import annotations

import math

import torch

from a2ats_tools.rope import apply_rope


def random_whitening(hkv: int, d: int, gen: torch.Generator) -> torch.Tensor:
    """A random lower-triangular whitening factor ``[Hkv, d, d]`` (the Cholesky factor of ``I + 0.3 A Aᵀ``)."""
    a = torch.randn(hkv, d, d, generator=gen)
    return torch.linalg.cholesky(torch.eye(d) + 0.3 * a @ a.transpose(1, 2))


def nearest_whitened_centroid(keys: torch.Tensor, codebook: torch.Tensor, whitening: torch.Tensor) -> torch.Tensor:
    """Codes ``[B, Hkv, N]`` (long): the centroid nearest each key under ``‖(k − c) L‖``."""
    return torch.cdist(keys.float() @ whitening, (codebook @ whitening).unsqueeze(0)).argmin(-1)


def token_score(
    q_pre: torch.Tensor, codebook: torch.Tensor, code: int, cos: torch.Tensor, sin: torch.Tensor, aggregation: str
) -> float:
    """One token's score, head by head: each query ``q_pre [G, d]`` rotated by ``cos``/``sin [d]`` (its bucket
    centre) dotted with the token's centroid ``codebook[code]``, summed or maxed over the group."""
    heads = [float(apply_rope(q[None], cos[None], sin[None])[0] @ codebook[code]) for q in q_pre]
    return sum(heads) if aggregation == "sum" else max(heads)


def masked_attention(q, k_cache, v_cache, indices, keep, scale) -> torch.Tensor:
    """Softmax attention of ``q [B, Hq, d]`` over the kept rows, through a dense mask over the whole cache
    (float32; a head with nothing kept gives zeros)."""
    b, hq, d = q.shape
    hkv, n = k_cache.shape[1], k_cache.shape[2]
    chosen = torch.zeros(b, hkv, n, dtype=torch.bool).scatter_(2, indices, keep)
    logits = (q.float().reshape(b, hkv, hq // hkv, d) @ k_cache.float().transpose(-1, -2)) * scale
    probs = logits.masked_fill(~chosen.unsqueeze(2), -math.inf).softmax(-1).nan_to_num(0.0)
    return (probs @ v_cache.float()).reshape(b, hq, -1)
