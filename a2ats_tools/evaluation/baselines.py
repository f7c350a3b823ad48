"""The recall curve's reference scorer for the Quest baseline (its runtime selector is
:mod:`a2ats_tools.runtime.selectors.quest`)."""

from __future__ import annotations

import torch

from ..runtime.selectors.quest import PAGE, page_bounds, page_scores


def quest_token_scores(
    q_post: torch.Tensor, keys_post: torch.Tensor, num_kv_heads: int, page: int = PAGE
) -> torch.Tensor:
    """Reference: per-query-head token scores ``[Hq, M, N]`` (each token gets its page's bound).

    ``q_post [Hq, M, d]`` post-RoPE queries, ``keys_post [Hkv, N, d]`` post-RoPE keys (pages over all N; the
    partial last page's bound only covers real tokens).
    """
    hq, m, d = q_post.shape
    n = keys_post.shape[1]
    kmin, kmax = page_bounds(keys_post, page)  # [Hkv, P, d]
    q = q_post.reshape(num_kv_heads, hq // num_kv_heads, m, d).permute(2, 0, 1, 3)  # [M, Hkv, G, d]
    s = page_scores(q, kmin, kmax)  # [M, Hkv, G, P]
    s = s.repeat_interleave(page, -1)[..., :n]  # [M, Hkv, G, N]
    return s.reshape(m, hq, n).transpose(0, 1)
