"""The selector base class and the helpers every selector shares (row gathers, exact candidate logits, ranking
keys). Sinks and the local window are always kept, padding is never kept, each sample gets its own budget, and
approximate scorers may re-rank an over-fetched candidate set exactly; a subclass usually implements only
``scores``."""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from ...kernels.sparse_attention import gather_rows
from ...rope import HALVES, RopeLayout, undo_rope_keys
from ...selection import Selection, StepBudget, select, step_budget
from ..settings import RuntimeSettings


class TokenSelector:
    """Base class: subclasses override :meth:`scores` (and :meth:`on_append` to maintain metadata).

    ``state`` is the layer's :class:`~a2ats_tools.runtime.cache.LayerState`: ``keys``/``values``
    ``[B, Hkv, capacity, d]`` (post-RoPE, possibly on the host when offloaded), ``length``, ``capacity``,
    ``device`` (compute device), ``meta`` (a dict the selector owns) and ``step`` (the
    :class:`~a2ats_tools.runtime.step.StepContext` that what is derived once per step is shared through).
    """

    name: ClassVar[str] = "base"
    dense: ClassVar[bool] = False  # True: decode attends to every row with SDPA (no selection)
    reranks: ClassVar[bool] = False  # True: the ``rerank`` setting applies (approximate scorers only)
    full_keep_shortcut: ClassVar[bool] = True  # decode densely while the budget covers every row (tests turn it off)

    def __init__(
        self, settings: RuntimeSettings, layer_idx: int, num_heads: int, num_kv_heads: int, head_dim: int,
        layout: RopeLayout = HALVES,
    ):
        """``layout``: how the layer's RoPE pairs dimensions (the model's, for undoing it on keys and queries)."""
        self.settings = settings
        self.layout = layout
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.group = num_heads // num_kv_heads
        self.scale = head_dim**-0.5

    # --- metadata hooks -------------------------------------------------------------------------------------
    def on_prefill(self, state: Any, keys_pre: torch.Tensor, keys_post: torch.Tensor, start: int) -> None:
        """Keys ``[B, Hkv, n, d]`` written at rows ``start..start+n`` by a prefill chunk (default: on_append)."""
        self.on_append(state, keys_pre, keys_post, start)

    def on_append(self, state: Any, keys_pre: torch.Tensor, keys_post: torch.Tensor, start: int) -> None:
        """Keys ``[B, Hkv, n, d]`` written at rows ``start..start+n`` (pre-RoPE and post-RoPE forms)."""

    def on_decode_append(
        self, state: Any, keys_post: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], start: int
    ) -> None:
        """A decode step's keys ``[B, Hkv, n, d]`` (post-RoPE), written at rows ``start..start+n``; ``rope``: the
        ``(cos, sin)`` ``[B or 1, n, d]`` that rotated them. Default: undo RoPE and call :meth:`on_append`; a
        selector that needs the pre-RoPE form only later may keep ``rope`` and defer that work."""
        cos, sin = rope
        keys_pre = undo_rope_keys(keys_post, cos, sin, self.layout)
        self.on_append(state, keys_pre, keys_post, start)

    # --- selection ------------------------------------------------------------------------------------------
    def scores(self, state: Any, q_pre: torch.Tensor, q_post: torch.Tensor, length: int) -> torch.Tensor:
        """Approximate importance ``[B, Hkv, length]`` of every cached row (higher is better)."""
        raise NotImplementedError

    def fused_decode(
        self, state: Any, q_post: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], length: int,
        valid: torch.Tensor, scale: float,
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Selection and attention in one fused kernel, where this selector has one that applies to this step:
        ``(out [B, Hq, d] float32, rows attended [B, Hkv, K])``; None: the caller runs :meth:`select` and the
        sparse attention. ``rope``: the step's ``(cos, sin)`` ``[B, d]``, which took ``q_pre`` to ``q_post``."""
        return None

    def step_budget(self, state: Any, valid: torch.Tensor, length: int) -> StepBudget:
        """:func:`~a2ats_tools.selection.step_budget` of ``valid``: computed once per step, shared by all layers."""
        s = self.settings
        key = ("budget", s.budget, s.n_sink, s.window, length)
        return state.step.shared(key, lambda: step_budget(valid, s), valid)

    def left_padding(self, state: Any, valid: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(first real row [B], top-K [B])`` (int64) when every sample's real rows are one suffix of the cache
        (no padding, or left padding), else None."""
        return self.step_budget(state, valid, length).suffix

    def keeps_everything(self, state: Any, valid: torch.Tensor, length: int) -> bool:
        """True while sinks + window + K cover every valid row of every sample: selecting would keep them all,
        so dense attention over the cache gives the same result without scoring (short contexts)."""
        if not self.full_keep_shortcut:
            return False
        return self.step_budget(state, valid, length).covers_all

    def select(
        self, state: Any, q_pre: torch.Tensor, q_post: torch.Tensor, length: int, valid: torch.Tensor
    ) -> Selection:
        """Rows to attend (:func:`a2ats_tools.selection.select` of this selector's :meth:`scores`).

        ``q_pre``/``q_post`` ``[B, Hq, d]``; ``valid [B, length]`` marks real tokens. Selectors that
        :attr:`reranks` re-rank their candidates by exact logits against the cached keys.
        """
        exact = (lambda rows: candidate_logits(state, q_post, rows, self.num_kv_heads)) if self.reranks else None
        return select(
            self.scores(state, q_pre, q_post, length), valid, self.settings,
            budget=self.step_budget(state, valid, length), exact=exact, scale=self.scale,
        )


def candidate_logits(state, q_post: torch.Tensor, indices: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """Exact float32 logits ``[B, Hkv, G, K]`` of ``q_post [B, Hq, d]`` on the rows ``indices [B, Hkv, K]``."""
    b, hq, d = q_post.shape
    rows = gather_rows(state.keys, indices, q_post.device)  # [B, Hkv, K, d]
    state.store_read_bytes += rows.numel() * rows.element_size()
    keys = rows.float()
    q = q_post.float().reshape(b, num_kv_heads, hq // num_kv_heads, d)
    return q @ keys.transpose(-1, -2)
