"""``quest``: Quest-style page selection. Per page of ``PAGE`` consecutive tokens the element-wise min and max
of the post-RoPE keys are kept as keys arrive; a query's page score ``Σ_d max(q_d·min_d, q_d·max_d)``
upper-bounds its logit on every token of the page. Every token takes its page's score, so top-K over tokens
picks whole pages (best first) until the budget is met."""

from __future__ import annotations

import torch

from ...scoring import group_aggregate
from .base import TokenSelector

PAGE = 16


def page_bounds(keys_post: torch.Tensor, page: int = PAGE) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-page element-wise ``(min, max)`` of ``keys_post [..., N, d]`` -> ``[..., ceil(N/page), d]`` each."""
    *lead, n, d = keys_post.shape
    pages = -(-n // page)
    pad = pages * page - n
    k = keys_post.float()
    if pad:
        k = torch.cat([k, k[..., -1:, :].expand(*lead, pad, d)], -2)  # repeat the last key: bounds unchanged
    k = k.reshape(*lead, pages, page, d)
    return k.amin(-2), k.amax(-2)


def page_scores(q_post: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor) -> torch.Tensor:
    """Upper bounds ``Σ_d max(q_d·min_d, q_d·max_d)``: ``q_post [..., Hkv, G, d]``, bounds ``[..., Hkv, P, d]``
    -> ``[..., Hkv, G, P]``."""
    q = q_post.float().unsqueeze(-2)  # [..., Hkv, G, 1, d]
    return torch.maximum(q * kmin.unsqueeze(-3), q * kmax.unsqueeze(-3)).sum(-1)


class QuestSelector(TokenSelector):
    """Quest: per-page min/max of post-RoPE keys, kept up to date as keys arrive."""

    name = "quest"

    def on_append(self, state, keys_pre, keys_post, start):
        n = keys_post.shape[2]
        b, h, _, d = keys_post.shape
        pages_needed = -(-state.capacity // PAGE)
        meta = state.meta
        if "kmin" not in meta or meta["kmin"].shape[2] < pages_needed:
            kmin = torch.full((b, h, pages_needed, d), float("inf"), device=state.device)
            kmax = torch.full((b, h, pages_needed, d), float("-inf"), device=state.device)
            if "kmin" in meta:
                kmin[:, :, : meta["kmin"].shape[2]] = meta["kmin"]
                kmax[:, :, : meta["kmax"].shape[2]] = meta["kmax"]
            meta["kmin"], meta["kmax"] = kmin, kmax
        keys = keys_post.to(state.device).float()
        first, last = start // PAGE, (start + n - 1) // PAGE
        for p in range(first, last + 1):  # at most a few pages per call when decoding
            lo, hi = max(start, p * PAGE) - start, min(start + n, (p + 1) * PAGE) - start
            if hi - lo > 0:
                chunk = keys[:, :, lo:hi]
                meta["kmin"][:, :, p] = torch.minimum(meta["kmin"][:, :, p], chunk.amin(2))
                meta["kmax"][:, :, p] = torch.maximum(meta["kmax"][:, :, p], chunk.amax(2))

    def on_prefill(self, state, keys_pre, keys_post, start):
        self.on_append(state, keys_pre, keys_post, start)

    def scores(self, state, q_pre, q_post, length):
        b, hq, d = q_post.shape
        pages = -(-length // PAGE)
        kmin, kmax = state.meta["kmin"][:, :, :pages], state.meta["kmax"][:, :, :pages]
        q = q_post.float().reshape(b, self.num_kv_heads, self.group, d)
        s = page_scores(q, kmin.to(q.device), kmax.to(q.device))  # [B, Hkv, G, P]
        s = s.repeat_interleave(PAGE, -1)[..., :length].reshape(b, hq, length)
        return group_aggregate(s, self.num_kv_heads, self.settings.aggregation, self.scale)
