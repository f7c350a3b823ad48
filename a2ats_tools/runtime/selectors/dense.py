"""``dense``: exact attention over every row (the ``dense_layers`` setting)."""

from __future__ import annotations

import torch

from .base import TokenSelector


class DenseSelector(TokenSelector):
    """Exact dense attention over every row (``dense_layers``): keeps no metadata; decode runs SDPA on the cache."""

    name = "dense"
    dense = True

    def scores(self, state, q_pre, q_post, length):
        return torch.zeros(q_post.shape[0], self.num_kv_heads, length, device=q_post.device)
