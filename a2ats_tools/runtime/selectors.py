"""Token-selection strategies for decode steps (kvpress style): one object per layer, chosen by name.

A selector keeps whatever per-token metadata it needs as keys enter the cache (``on_append``) and, at each
decode step, returns the rows each KV head attends to (``select``). The base class handles what all share:
sinks and the local window are always kept, padding is never kept, each sample gets its own budget, and the
optional exact re-ranking of an over-fetched candidate set. A subclass usually implements only ``scores``.
"""

from __future__ import annotations

import math
import operator
import weakref
from typing import Any, ClassVar, NamedTuple

import torch

from ..rope import DistanceBuckets, Rotary, apply_rope, undo_rope_keys
from ..scoring import group_aggregate
from .settings import RuntimeSettings, cpu_has_native_bf16, resolve_score_dtype, use_cpu_kernel, use_triton

_STEP_MEMO: tuple | None = None  # (weakref to valid, settings key, constants) of the current decode step
_OFFSET_MEMO: tuple | None = None  # (key, (per-table offsets, buckets used)) of the current decode step
_PLAN_MEMO: tuple | None = None  # (objects, numbers, _FusedPlan or None) of the current decode step (fused CPU kernel)
NEG_INF = float("-inf")
POS_INF = float("inf")


class _FusedPlan(NamedTuple):
    kernel: Any  # kernels.cpu_decode.StepPlan
    offsets_used: int  # buckets in use this step


class TokenSelector:
    """Base class: subclasses override :meth:`scores` (and :meth:`on_append` to maintain metadata).

    ``state`` is the layer's :class:`~a2ats_tools.runtime.cache.LayerState`: ``keys``/``values``
    ``[B, Hkv, capacity, d]`` (post-RoPE, possibly on the host when offloaded), ``length``, ``capacity``,
    ``device`` (compute device) and ``meta`` (a dict the selector owns).
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

    def _step_constants(self, valid: torch.Tensor, length: int):
        """Budgets and forced rows depend only on ``valid``: computed once per step, shared by all layers."""
        global _STEP_MEMO
        memo = _STEP_MEMO
        key = (self.settings.budget, self.settings.n_sink, self.settings.window, length)
        if memo is not None and memo[0]() is valid and memo[1] == key:
            return memo[2]
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
        out = (rows, top, int(rows.max()), forced, int(top.max()) if unpadded else None, covers_all, suffix)
        _STEP_MEMO = (weakref.ref(valid), key, out)
        return out

    def left_padding(self, valid: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(first real row [B], top-K [B])`` (int64) when every sample's real rows are one suffix of the cache
        (no padding, or left padding), else None (part of the step's constants)."""
        return self._step_constants(valid, length)[6]

    def keeps_everything(self, valid: torch.Tensor, length: int) -> bool:
        """True while sinks + window + K cover every valid row of every sample: selecting would keep them all,
        so dense attention over the cache gives the same result without scoring (short contexts)."""
        if not self.full_keep_shortcut:
            return False
        return self._step_constants(valid, length)[5]

    def select(
        self, state: Any, q_pre: torch.Tensor, q_post: torch.Tensor, length: int, valid: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows to attend: ``indices [B, Hkv, K]`` (long) and ``keep [B, Hkv, K]`` (bool).

        ``q_pre``/``q_post`` ``[B, Hq, d]``; ``valid [B, length]`` marks real tokens. Row ``K`` is the largest
        per-sample budget; ``keep`` is False past a sample's own budget. Never more than
        ``n_sink + window + top-K`` kept rows per KV head.
        """
        rows, top, k, forced, uniform_top, _, _ = self._step_constants(valid, length)
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


_ROW_BASE: dict[tuple, torch.Tensor] = {}


def _row_base(b: int, h: int, cap: int, device: torch.device) -> torch.Tensor:
    """``[B, Hkv, 1]`` offsets ``(b * Hkv + h) * cap`` of each (sample, KV head) block in a flattened buffer
    (the same for every layer and step until the capacity grows: kept for the latest few shapes)."""
    key = (b, h, cap, device)
    base = _ROW_BASE.get(key)
    if base is None:
        if len(_ROW_BASE) > 8:
            _ROW_BASE.clear()
        base = _ROW_BASE[key] = torch.arange(b * h, device=device).view(b, h, 1) * cap
    return base


def gather_rows(buffer: torch.Tensor, indices: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``buffer [B, Hkv, cap, d]`` rows at ``indices [B, Hkv, K]`` -> ``[B, Hkv, K, d]`` on ``device``.

    When the buffer lives on the host (offload), the gather runs there and only the selected rows move.
    """
    b, h, cap, d = buffer.shape
    idx = indices.to(buffer.device)
    rows = buffer.view(b * h * cap, d).index_select(0, (idx + _row_base(b, h, cap, buffer.device)).reshape(-1))
    return rows.view(*idx.shape, d).to(device, non_blocking=True)


def candidate_logits(state, q_post: torch.Tensor, indices: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """Exact float32 logits ``[B, Hkv, G, K]`` of ``q_post [B, Hq, d]`` on the rows ``indices [B, Hkv, K]``."""
    b, hq, d = q_post.shape
    keys = gather_rows(state.keys, indices, q_post.device).float()  # [B, Hkv, K, d]
    q = q_post.float().reshape(b, num_kv_heads, hq // num_kv_heads, d)
    return q @ keys.transpose(-1, -2)


class DenseSelector(TokenSelector):
    """Exact dense attention over every row (``dense_layers``): keeps no metadata; decode runs SDPA on the cache."""

    name = "dense"
    dense = True

    def scores(self, state, q_pre, q_post, length):
        return torch.zeros(q_post.shape[0], self.num_kv_heads, length, device=q_post.device)


class StreamingSelector(TokenSelector):
    """StreamingLLM: sinks plus a window enlarged to spend the same per-KV-head budget on the most recent rows."""

    name = "streaming"

    def scores(self, state, q_pre, q_post, length):
        b = q_post.shape[0]
        recency = torch.arange(length, device=q_post.device, dtype=torch.float32)
        return recency.expand(b, self.num_kv_heads, length)


class ExactTopKSelector(TokenSelector):
    """Oracle: exact logits against the true keys (reads every key; for tests and evaluation)."""

    name = "exact"

    def scores(self, state, q_pre, q_post, length):
        b, hq, d = q_post.shape
        keys = state.keys[:, :, :length].to(q_post.device).float()
        q = q_post.float().reshape(b, self.num_kv_heads, self.group, d)
        logits = (q @ keys.transpose(-1, -2)).reshape(b, hq, length)
        return group_aggregate(logits, self.num_kv_heads, self.settings.aggregation, self.scale)


class A2atsSelector(TokenSelector):
    """A²ATS: keys encoded once to VQ codes (nearest centroid in the whitened space, pre-RoPE); each step builds
    a per-query table ``table[bucket, code] = (R(centre_bucket) q) . codebook[code]`` and gathers it."""

    name = "a2ats"
    reranks = True
    ENCODE_TEMP_BYTES = 24 << 20  # bounds the [Hkv, rows, C] distance temporary of one encode matmul: kept near
    # cache-sized, encoding 16K keys took 0.55 s instead of 0.77 s with 4096-row chunks (2-core AVX2 CPU)
    ENCODE_BLOCK = 32  # decode steps: keys encoded together (at most the window, so pending keys are always kept)

    def __init__(self, settings, layer_idx, num_heads, num_kv_heads, head_dim, *, codebook, whitening, rotary: Rotary):
        super().__init__(settings, layer_idx, num_heads, num_kv_heads, head_dim)
        cb, wf = codebook.float(), whitening.float()
        self._whitening, self._encode_tables = wf, None
        self.codebook_t = cb.transpose(1, 2).contiguous()  # [Hkv, d, C]
        whitened = cb @ wf  # [Hkv, C, d]: centroids in the whitened space (rows times L)
        self.encode_weight = (wf @ whitened.transpose(1, 2)).contiguous()  # [Hkv, d, C]
        self.encode_bias = (-0.5 * whitened.pow(2).sum(-1)).unsqueeze(1).contiguous()  # [Hkv, 1, C]
        self.codes_size = cb.shape[1]
        from ..kernels.encode import code_dtype

        self.code_dtype = code_dtype(self.codes_size)  # every codes buffer's dtype: int16, int32 past 32767 codes
        buckets: DistanceBuckets = settings.buckets
        self.buckets = buckets
        cos, sin = rotary.cos_sin(torch.tensor(buckets.centres))
        self.cos, self.sin = cos, sin  # [P, d]
        self._scoring_codebooks: dict[torch.dtype, torch.Tensor] = {}  # the table's right operand, per dtype
        self._codebook_tiles: torch.Tensor | None = None  # the fused CPU kernel's layouts, made on first use
        self._encode_tiles: torch.Tensor | None = None

    def to(self, device: torch.device) -> A2atsSelector:
        for name in ("codebook_t", "encode_weight", "encode_bias", "cos", "sin", "_whitening"):
            setattr(self, name, getattr(self, name).to(device))
        self._scoring_codebooks, self._encode_tables, self._codebook_tiles, self._encode_tiles = {}, None, None, None
        return self

    def encode(self, keys_pre: torch.Tensor) -> torch.Tensor:
        """Nearest centroid (whitened metric) of ``keys_pre [B, Hkv, n, d]`` -> codes ``[B, Hkv, n]`` of
        :attr:`code_dtype`."""
        if use_triton(self.settings.kernels, keys_pre, self.codebook_t):  # fused encode (same codes, tested)
            import importlib

            kernel = importlib.import_module("a2ats_tools.kernels.encode")
            if getattr(self, "_encode_tables", None) is None:
                self._encode_tables = kernel.prepare_codebook(self.codebook_t.transpose(1, 2), self._whitening)
            return kernel.encode(keys_pre, self._encode_tables, backend="triton")
        b, h, n, d = keys_pre.shape
        flat = keys_pre.float().transpose(0, 1).reshape(h, b * n, d)
        if self.codes_size % 16 == 0 and self.code_dtype == torch.int16 and use_cpu_kernel(self.settings.kernels, keys_pre):
            # the fused CPU kernel: matmul and argmax in one pass, no [rows, C] temporary (tested against the below)
            from ..kernels import cpu_decode

            if self._encode_tiles is None:
                self._encode_tiles = cpu_decode.codebook_tiles(self.encode_weight.transpose(1, 2))
            codes = cpu_decode.encode(flat, self._encode_tiles, self.encode_bias[:, 0])
            return codes.reshape(h, b, n).transpose(0, 1)
        out = torch.empty(h, b * n, dtype=self.code_dtype, device=keys_pre.device)
        rows = max(64, self.ENCODE_TEMP_BYTES // (4 * h * self.codes_size))
        for i in range(0, b * n, rows):
            part = torch.baddbmm(self.encode_bias, flat[:, i : i + rows], self.encode_weight)
            out[:, i : i + rows] = part.argmax(-1)
        return out.reshape(h, b, n).transpose(0, 1)

    def _codes_buffer(self, state, b: int, h: int) -> torch.Tensor:
        codes = state.meta.get("codes")
        if codes is None or codes.shape[-1] < state.capacity:
            grown = torch.zeros(b, h, state.capacity, dtype=self.code_dtype, device=state.device)
            if codes is not None:
                grown[:, :, : codes.shape[-1]] = codes
            state.meta["codes"] = codes = grown
        return codes

    def on_append(self, state, keys_pre, keys_post, start):
        """Prefill chunks (and any caller with pre-RoPE keys): encode now, after the pending decode keys."""
        self._flush(state)
        b, h, n, _ = keys_pre.shape
        self._codes_buffer(state, b, h)[:, :, start : start + n] = self.encode(keys_pre.to(state.device))

    def on_decode_append(self, state, keys_post, rope, start):
        """Decode steps defer encoding: a new key sits in the always-kept window, so its code is not read until
        it leaves. Only the step's cos/sin are kept; once ``encode_block`` keys have gathered, they are read back
        from the cache, taken back to pre-RoPE form and encoded together (one matmul instead of one per step,
        and no per-step RoPE work). Pending rows never outnumber the window, so every row a selection ranks has
        its code."""
        meta = state.meta
        block = max(1, min(self.ENCODE_BLOCK, self.settings.window))
        cos, sin = rope  # [B or 1, n, d]
        b, n = keys_post.shape[0], keys_post.shape[2]
        count = meta.get("pending_count", 0)
        if count + n > block:
            self._flush(state)
            count = 0
        if count == 0:
            meta["pending_start"] = start
            room = max(block, n)
            if meta.get("pending_cos") is None or meta["pending_cos"].shape[:2] != (b, room):
                meta["pending_cos"] = torch.empty(b, room, cos.shape[-1], device=state.device)
                meta["pending_sin"] = torch.empty_like(meta["pending_cos"])
        meta["pending_cos"][:, count : count + n] = cos
        meta["pending_sin"][:, count : count + n] = sin
        meta["pending_count"] = count = count + n
        if count >= block:
            self._flush(state)

    def _flush(self, state) -> None:
        """Encode the pending decode keys (read back from the cache, RoPE undone with their stashed cos/sin)."""
        count = state.meta.pop("pending_count", 0)
        start = state.meta.pop("pending_start", None)
        if not count:
            return
        cos, sin = state.meta["pending_cos"][:, :count], state.meta["pending_sin"][:, :count]
        keys_post = state.keys[:, :, start : start + count].to(state.device)
        b, h = keys_post.shape[:2]
        self._codes_buffer(state, b, h)[:, :, start : start + count] = self.encode(undo_rope_keys(keys_post, cos, sin))

    def bucket_index(self, length: int, device: torch.device) -> tuple[torch.Tensor, int]:
        """Offsets into one (sample, KV head)'s score table for this step: ``(offsets, used)``.

        For row ``j < length`` (t = length - 1), ``offsets [length]`` (int64, what ``gather`` takes) is
        ``bucket(t - j) * C``, the start of row ``j``'s bucket inside a ``[used * C]`` table; ``used`` is the
        number of buckets in use. The same for every layer of a step, so computed once per step and shared (the
        memo holds the latest step only).
        """
        global _OFFSET_MEMO
        key = (self.buckets, self.codes_size, length, device)
        memo = _OFFSET_MEMO
        if memo is not None and memo[0] == key:
            return memo[1]
        dist = (length - 1) - torch.arange(length, device=device)
        bucket = self.buckets.bucket_of(dist)
        used = int(bucket.max()) + 1 if length else 1
        out = (bucket.long() * self.codes_size, used)
        _OFFSET_MEMO = (key, out)
        return out

    def rotated_queries(self, q_pre: torch.Tensor, used: int) -> torch.Tensor:
        """``[Hkv, B, G', used, d]`` float32: each query rotated to the first ``used`` bucket centres (``G' = 1``
        for ``sum``: the group's queries are folded first, since scores are linear in the query)."""
        b, hq, d = q_pre.shape
        q = q_pre.float().reshape(b, self.num_kv_heads, self.group, d)
        if self.settings.aggregation == "sum":
            q = q.sum(2, keepdim=True)
        qw = apply_rope(q.unsqueeze(3), self.cos[:used], self.sin[:used])  # [B, Hkv, G', P, d]
        return qw.transpose(0, 1)

    def tables(self, q_pre: torch.Tensor, used: int) -> torch.Tensor:
        """``[B, Hkv, G', used * C]`` score tables (``G' = 1`` for ``sum``), in ``score_dtype``."""
        b = q_pre.shape[0]
        rotated = self.rotated_queries(q_pre, used)
        g = rotated.shape[2]
        qw = rotated.reshape(self.num_kv_heads, b * g * used, -1)
        dtype = resolve_score_dtype(self.settings.score_dtype, qw.device)
        emulate = dtype == torch.bfloat16 and qw.device.type == "cpu" and not cpu_has_native_bf16()
        codebook = self._scoring_codebooks.get(dtype)
        if codebook is None or codebook.device != qw.device:
            codebook = self.codebook_t.to(qw.device, dtype)
            self._scoring_codebooks[dtype] = codebook = codebook.float() if emulate else codebook
        if emulate:  # bf16 operands, float32 product, bf16 table: what a native bf16 product computes, ~100x faster
            table = torch.bmm(qw.to(dtype).float(), codebook).to(dtype)
        else:
            table = torch.bmm(qw.to(dtype), codebook)  # [Hkv, B*G'*P, C]
        return table.reshape(self.num_kv_heads, b, g, used * self.codes_size).transpose(0, 1)

    def scores(self, state, q_pre, q_post, length):
        b, h = q_pre.shape[0], self.num_kv_heads
        codes = self._codes_buffer(state, b, h)[:, :, :length]  # pending (windowed) rows read stale codes
        offsets, used = self.bucket_index(length, q_pre.device)
        table = self.tables(q_pre, used)
        g = table.shape[2]
        if g == 1 and use_triton(self.settings.kernels, table, codes):
            return self._scores_triton(table, codes, length, used)
        index = offsets + codes  # [B, Hkv, N] int64: bucket * C + code, inside each (sample, KV head)'s table
        if g == 1:  # gather the scores' bits (integer gather: ~2x faster than index_select or a bf16 gather here)
            bits = table[:, :, 0].view(_KEY_TYPES[table.element_size()])
            return bits.gather(-1, index).view(table.dtype)
        s = table.gather(-1, index.unsqueeze(2).expand(-1, -1, g, -1))  # [B, Hkv, G', N]
        return group_aggregate(s.reshape(b, self.num_heads, length), self.num_kv_heads, self.settings.aggregation, self.scale)

    def fused_decode(self, state, q_post, rope, length, valid, scale):
        """The fused CPU kernel (``kernels/cpu_decode``: scoring queries, tables, top-K, re-rank and attention in
        one call) where it applies: ``kernels`` auto or cpu with everything on the CPU (:func:`use_cpu_kernel`),
        float32 K/V and score tables, no padding or left padding, a codebook size divisible by 16 whose codes
        fit int16 (the kernel's codes)."""
        if not use_cpu_kernel(self.settings.kernels, state.keys, q_post):
            return None
        if (
            state.keys.dtype != torch.float32
            or self.codes_size % 16
            or self.code_dtype != torch.int16
            or resolve_score_dtype(self.settings.score_dtype, q_post.device) != torch.float32
        ):
            return None
        plan = self._step_plan(rope, length, valid)
        if plan is None:
            return None
        from ..kernels import cpu_decode

        if self._codebook_tiles is None:
            self._codebook_tiles = cpu_decode.codebook_tiles(self.codebook_t.transpose(1, 2))
        used = plan.offsets_used
        return cpu_decode.decode_layer(
            plan.kernel, q_post.float(), self.cos[:used], self.sin[:used], self._codebook_tiles,
            self._codes_buffer(state, q_post.shape[0], self.num_kv_heads), state.keys, state.values, scale,
        )

    def _step_plan(self, rope, length: int, valid: torch.Tensor) -> _FusedPlan | None:
        """The fused kernel's per-step arguments (None: padding other than left padding), built by the first
        layer of a step and shared by the others (same rotary factors, mask and settings)."""
        global _PLAN_MEMO
        same = (rope[0], rope[1], valid, self.settings, self.buckets)  # compared by identity
        memo = _PLAN_MEMO
        if memo is not None and memo[1] == (length, self.codes_size) and all(map(operator.is_, memo[0], same)):
            return memo[2]
        padding = self.left_padding(valid, length)
        plan = None
        if padding is not None:
            from ..kernels import cpu_decode

            offsets, used = self.bucket_index(length, valid.device)
            b = valid.shape[0]
            cos, sin = (t.float().expand(b, -1) for t in rope)  # [1, d] where the batch shares positions
            first, top = padding
            s = self.settings
            kernel = cpu_decode.plan_step(
                cos, sin, offsets, length, s.n_sink, s.window, top, s.rerank, s.rerank_aggregation, first=first,
                aggregation=s.aggregation,
            )
            plan = _FusedPlan(kernel, used)
        _PLAN_MEMO = (same, (length, self.codes_size), plan)
        return plan

    def _scores_triton(self, table: torch.Tensor, codes: torch.Tensor, length: int, used: int) -> torch.Tensor:
        """The same scores as the torch gather, from the fused Triton gather (one program per token block)."""
        import importlib

        kernel = importlib.import_module("a2ats_tools.kernels.score_select")
        b, h = table.shape[:2]
        edges = self.buckets.edges
        start, ratio = (edges[0], edges[1] / edges[0]) if len(edges) > 1 else (64.0, 2.0)
        no_forced = torch.zeros(b, dtype=torch.long, device=table.device)  # select() masks sinks/window/padding
        tables = table.reshape(b, h, 1, used, self.codes_size)
        return kernel.score_triton(tables, codes, length, no_forced, 0, 0, start, ratio, "sum")


SELECTOR_CLASSES: dict[str, type[TokenSelector]] = {
    cls.name: cls for cls in (A2atsSelector, StreamingSelector, ExactTopKSelector, DenseSelector)
}


def register_selector(cls: type[TokenSelector]) -> type[TokenSelector]:
    """Make a selector available by its ``name`` (e.g. a Quest-style page selector from the eval package)."""
    SELECTOR_CLASSES[cls.name] = cls
    return cls


__all__ = [
    "TokenSelector", "A2atsSelector", "StreamingSelector", "ExactTopKSelector", "DenseSelector", "register_selector",
]
