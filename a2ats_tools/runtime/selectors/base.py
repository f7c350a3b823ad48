"""The selector base class and the helpers every selector shares (row gathers, exact candidate logits, ranking
keys). Sinks and the local window are always kept, padding is never kept, each sample gets its own budget, and
approximate scorers may re-rank an over-fetched candidate set exactly; a subclass usually implements only
``scores``."""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch

from ...rope import undo_rope_keys
from ...scoring import group_aggregate
from ..settings import RuntimeSettings

NEG_INF = float("-inf")
POS_INF = float("inf")

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
    exact_logits: torch.Tensor | None = None  # set by select(): exact logits [B, Hkv, G, K] of the kept rows, if known

    def __init__(self, settings: RuntimeSettings, layer_idx: int, num_heads: int, num_kv_heads: int, head_dim: int):
        self.settings = settings
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
        keys_pre = undo_rope_keys(keys_post, cos, sin)
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

    def budgets(self, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample ``(rows kept, top-K part)`` from the number of valid tokens ``[B]``."""
        context = valid.sum(-1)
        b = self.settings.budget
        if isinstance(b, float) and b <= 1.0:
            top = (context.double() * b).round().long().clamp_min(1)
        else:
            top = torch.full_like(context, int(b))
        rows = torch.minimum(context, top + self.settings.n_sink + self.settings.window)
        return rows, top

    def forced(self, valid: torch.Tensor, length: int) -> torch.Tensor:
        """``[B, N]``: the first ``n_sink`` valid rows and the last ``window`` rows (within ``valid``)."""
        rank = valid.cumsum(-1) - 1
        idx = torch.arange(length, device=valid.device)
        return valid & ((rank < self.settings.n_sink) | (idx > length - 1 - self.settings.window))

    def _step_constants(self, state: Any, valid: torch.Tensor, length: int):
        """Budgets and forced rows depend only on ``valid``: computed once per step, shared by all layers."""
        key = ("constants", self.settings.budget, self.settings.n_sink, self.settings.window, length)
        return state.step.shared(key, lambda: self._derive_constants(valid, length), valid)

    def _derive_constants(self, valid: torch.Tensor, length: int):
        rows, top = self.budgets(valid)
        unpadded = bool(valid.all())  # then the forced rows are plain slices and nothing needs masking
        forced = None if unpadded else self.forced(valid, length)[:, None, :]
        covers_all = bool((rows >= valid.sum(-1)).all())  # sinks + window + K reach every valid row
        if unpadded:
            first = torch.zeros(valid.shape[0], dtype=torch.int64)
        elif bool((valid[:, 1:] >= valid[:, :-1]).all()):  # False then True: left padding
            first = (length - valid.sum(-1)).to(torch.int64).contiguous()
        else:
            first = None
        suffix = None if first is None else (first, top.to(torch.int64).contiguous())
        return rows, top, int(rows.max()), forced, int(top.max()) if unpadded else None, covers_all, suffix

    def left_padding(self, state: Any, valid: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(first real row [B], top-K [B])`` (int64) when every sample's real rows are one suffix of the cache
        (no padding, or left padding), else None (part of the step's constants)."""
        return self._step_constants(state, valid, length)[6]

    def keeps_everything(self, state: Any, valid: torch.Tensor, length: int) -> bool:
        """True while sinks + window + K cover every valid row of every sample: selecting would keep them all,
        so dense attention over the cache gives the same result without scoring (short contexts)."""
        if not self.full_keep_shortcut:
            return False
        return self._step_constants(state, valid, length)[5]

    def select(
        self, state: Any, q_pre: torch.Tensor, q_post: torch.Tensor, length: int, valid: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows to attend: ``indices [B, Hkv, K]`` (long) and ``keep [B, Hkv, K]`` (bool).

        ``q_pre``/``q_post`` ``[B, Hq, d]``; ``valid [B, length]`` marks real tokens. Row ``K`` is the largest
        per-sample budget; ``keep`` is False past a sample's own budget. Never more than
        ``n_sink + window + top-K`` kept rows per KV head.
        """
        rows, top, k, forced, uniform_top, _, _ = self._step_constants(state, valid, length)
        self.exact_logits = None
        s, high, low = rank_keys(self.scores(state, q_pre, q_post, length))  # a new tensor: modified in place
        if forced is None:  # no padding: sinks are the first rows, the window the last ones
            s[..., : self.settings.n_sink] = high
            s[..., max(0, length - self.settings.window) :] = high
        else:
            s = s.masked_fill(~valid[:, None, :], low).masked_fill(forced, high)
        if self.reranks and self.settings.rerank and k < length:
            if uniform_top is not None:
                return self._rerank_uniform(state, s, high, q_post, k, uniform_top, length)
            return self._rerank(state, s, high, low, q_post, rows, top, length)
        uniform = rows.numel() == 1 or bool((rows == k).all())  # same budget everywhere: no order needed
        vals, indices = torch.topk(s, k, dim=-1, sorted=not uniform)
        keep = vals > low
        if not uniform:
            keep &= torch.arange(k, device=s.device) < rows[:, None, None]
        indices, order = indices.sort(-1)  # ascending rows: the K/V gathers walk memory forward
        return indices, keep.gather(-1, order)

    def _rerank(self, state, s, high, low, q_post, rows, top, length):
        """Over-fetch ``rerank``·top-K candidates by approximate score, keep the best by exact score (the group's
        exact logits aggregated by ``rerank_aggregation``; for ``softmax``, over the candidates)."""
        extra = (top.double() * self.settings.rerank).ceil().long()
        fetch = torch.minimum(rows - top + extra, (s > low).sum(-1).amax(-1))
        k2 = max(int(fetch.max()), int(rows.max()))
        vals, cand = torch.topk(s, k2, dim=-1, sorted=True)
        live = (torch.arange(k2, device=s.device) < fetch[:, None, None]) & (vals > low)
        logits = candidate_logits(state, q_post, cand, self.num_kv_heads)
        logits = logits.masked_fill(~live[:, :, None, :], NEG_INF)  # a softmax normalises over live rows only
        exact = self._rerank_scores(logits)
        exact = exact.masked_fill(vals == high, POS_INF).masked_fill(~live, NEG_INF)
        k = int(rows.max())
        v2, pick = torch.topk(exact, k, dim=-1, sorted=True)
        keep = (torch.arange(k, device=s.device) < rows[:, None, None]) & (v2 > NEG_INF)
        return cand.gather(-1, pick), keep

    def _rerank_uniform(self, state, s, high, q_post, k: int, top: int, length: int):
        """:meth:`_rerank` when every sample has the same budget and no padding (the common case): no ordering
        or masking is needed, and the exact logits of the kept rows are left in ``exact_logits`` so the sparse
        attention does not gather their keys and multiply them again."""
        fetch = min(length, k - top + math.ceil(top * self.settings.rerank))
        vals, cand = torch.topk(s, fetch, dim=-1, sorted=False)
        logits = candidate_logits(state, q_post, cand, self.num_kv_heads)  # [B, Hkv, G, fetch]
        exact = self._rerank_scores(logits, finite=True)
        exact.masked_fill_(vals == high, POS_INF)  # sinks and window stay
        pick = torch.topk(exact, k, dim=-1, sorted=False).indices
        self.exact_logits = logits.gather(-1, pick.unsqueeze(2).expand(-1, -1, self.group, -1))
        return cand.gather(-1, pick), torch.ones_like(pick, dtype=torch.bool)

    def _rerank_scores(self, logits: torch.Tensor, finite: bool = False) -> torch.Tensor:
        """Candidates' exact logits ``[B, Hkv, G, K]`` -> one score per KV head ``[B, Hkv, K]`` (``rerank_aggregation``;
        ``finite``: no candidate is masked)."""
        b, h, g, k = logits.shape
        how = self.settings.rerank_aggregation
        return group_aggregate(logits.reshape(b, h * g, k), h, how, self.scale, finite=finite)


_KEY_TYPES = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def rank_keys(scores: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """Floating scores -> ``(keys, high, low)``: integers of the same width whose order is the scores' order
    (IEEE bits, negatives flipped), plus two sentinels above and below every score's key (kept / never kept).

    ``topk`` over these keys picks the same rows as over the scores, faster (integer compares; a bf16 table
    keeps 16-bit keys: ~0.2 ms instead of ~0.35 ms for 12 rows of 8K on this CPU). ``-inf`` and ``+inf``
    scores stay strictly between the sentinels.
    """
    if not scores.is_floating_point():  # a selector's integer or boolean scores
        scores = scores.float()
    int_type = _KEY_TYPES[scores.element_size()]
    info = torch.iinfo(int_type)
    bits = scores.contiguous().view(int_type)
    keys = bits ^ ((bits >> (info.bits - 1)) & info.max)  # negative floats: reverse their order
    return keys, info.max, info.min


def gather_rows(buffer: torch.Tensor, indices: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``buffer [B, Hkv, cap, d]`` rows at ``indices [B, Hkv, K]`` -> ``[B, Hkv, K, d]`` on ``device``.

    When the buffer lives on the host (offload), the gather runs there and only the selected rows move.
    """
    b, h, cap, d = buffer.shape
    idx = indices.to(buffer.device)
    base = torch.arange(b * h, device=buffer.device).view(b, h, 1) * cap  # each (sample, KV head) block's start
    rows = buffer.view(b * h * cap, d).index_select(0, (idx + base).reshape(-1))
    return rows.view(*idx.shape, d).to(device, non_blocking=True)


def candidate_logits(state, q_post: torch.Tensor, indices: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """Exact float32 logits ``[B, Hkv, G, K]`` of ``q_post [B, Hq, d]`` on the rows ``indices [B, Hkv, K]``."""
    b, hq, d = q_post.shape
    keys = gather_rows(state.keys, indices, q_post.device).float()  # [B, Hkv, K, d]
    q = q_post.float().reshape(b, num_kv_heads, hq // num_kv_heads, d)
    return q @ keys.transpose(-1, -2)
