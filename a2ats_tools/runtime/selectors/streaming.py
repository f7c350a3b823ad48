"""``streaming``: StreamingLLM, sinks plus the most recent rows (recency as the score)."""

from __future__ import annotations

import torch

from .base import TokenSelector


class StreamingSelector(TokenSelector):
    """StreamingLLM: sinks plus a window enlarged to spend the same per-KV-head budget on the most recent rows."""

    name = "streaming"

    def scores(self, state, q_pre, q_post, length):
        b = q_post.shape[0]
        recency = torch.arange(length, device=q_post.device, dtype=torch.float32)
        return recency.expand(b, self.num_kv_heads, length)
