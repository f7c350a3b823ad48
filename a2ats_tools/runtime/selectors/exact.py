"""``exact``: the oracle top-K by exact logits against the true keys."""

from __future__ import annotations

from ...scoring import group_aggregate
from .base import TokenSelector


class ExactTopKSelector(TokenSelector):
    """Oracle: exact logits against the true keys (reads every key; for tests and evaluation)."""

    name = "exact"

    def scores(self, state, q_pre, q_post, length):
        b, hq, d = q_post.shape
        keys = state.keys[:, :, :length].to(q_post.device).float()
        q = q_post.float().reshape(b, self.num_kv_heads, self.group, d)
        logits = (q @ keys.transpose(-1, -2)).reshape(b, hq, length)
        return group_aggregate(logits, self.num_kv_heads, self.settings.aggregation, self.scale)
