"""``a2ats``: VQ codes of pre-RoPE keys scored through per-step distance-bucket tables, then exact re-ranking."""

from __future__ import annotations

import importlib
from typing import Any, NamedTuple

import torch

from ...kernels.score_select import build_tables, score
from ...rope import DistanceBuckets, Rotary, undo_rope_keys
from ..settings import cpu_has_native_bf16, resolve_score_dtype, use_cpu_kernel, use_triton
from .base import TokenSelector


def fused_kernel_refusal(rotary: Rotary) -> str | None:
    """Why the fused CPU kernel cannot serve layers rotated by ``rotary`` (None: it can). The kernel rotates every
    dimension by ``rotate_half`` halves; other rotations (partial rotary, adjacent pairs, NoPE) take the torch
    path, which applies the model's own layout."""
    if rotary.full:
        return None
    return f"the fused CPU kernel rotates all dimensions by halves, this model's retrieved layers: {rotary.describe()}"


class _FusedPlan(NamedTuple):
    kernel: Any  # kernels.cpu_decode.StepPlan
    offsets_used: int  # buckets in use this step


class A2atsSelector(TokenSelector):
    """A²ATS: keys encoded once to VQ codes (nearest centroid in the whitened space, pre-RoPE); each step builds
    a per-query table ``table[bucket, code] = (R(centre_bucket) q) . codebook[code]`` and gathers it."""

    name = "a2ats"
    reranks = True
    ENCODE_BLOCK = 32  # decode steps: keys encoded together (at most the window, so pending keys are always kept)

    def __init__(self, settings, layer_idx, num_heads, num_kv_heads, head_dim, *, codebook, whitening, rotary: Rotary):
        super().__init__(settings, layer_idx, num_heads, num_kv_heads, head_dim, rotary.layout)
        from ...kernels.encode import prepare_codebook

        cb = codebook.float()
        self.codebook_t = cb.transpose(1, 2).contiguous()  # [Hkv, d, C]
        self.encode_tables = prepare_codebook(cb, whitening)
        self.codes_size = cb.shape[1]
        self.code_dtype = self.encode_tables.code_dtype  # every codes buffer's dtype: int16, int32 past 32767 codes
        buckets: DistanceBuckets = settings.buckets
        self.buckets = buckets
        cos, sin = rotary.relative_cos_sin(torch.tensor(buckets.centres))  # the true logit's weighting
        self.cos, self.sin = cos, sin  # [P, r]: r < d for a partial rotary embedding
        self.fused_refusal = fused_kernel_refusal(rotary)
        self._scoring_codebooks: dict[torch.dtype, torch.Tensor] = {}  # the table's right operand, per dtype
        self._codebook_tiles: torch.Tensor | None = None  # the fused CPU kernel's layouts, made on first use
        self._encode_tiles: torch.Tensor | None = None

    def to(self, device: torch.device) -> A2atsSelector:
        for name in ("codebook_t", "cos", "sin"):
            setattr(self, name, getattr(self, name).to(device))
        self.encode_tables = self.encode_tables.to(device)
        self._scoring_codebooks, self._codebook_tiles, self._encode_tiles = {}, None, None
        return self

    def encode(self, keys_pre: torch.Tensor) -> torch.Tensor:
        """Nearest centroid (whitened metric) of ``keys_pre [B, Hkv, n, d]`` -> codes ``[B, Hkv, n]`` of
        :attr:`code_dtype`."""
        kernel = importlib.import_module("a2ats_tools.kernels.encode")  # the module (the package exports a function)
        tables = self.encode_tables
        if use_triton(self.settings.kernels, keys_pre, self.codebook_t):  # fused encode (same codes, tested)
            return kernel.encode_triton(keys_pre, tables)
        if self.codes_size % 16 == 0 and self.code_dtype == torch.int16 and use_cpu_kernel(self.settings.kernels, keys_pre):
            # the fused CPU kernel: matmul and argmax in one pass, no [rows, C] temporary (tested against torch)
            from ...kernels import cpu_decode

            b, h, n, d = keys_pre.shape
            if self._encode_tiles is None:
                self._encode_tiles = cpu_decode.codebook_tiles(tables.weight.transpose(1, 2))
            flat = keys_pre.float().transpose(0, 1).reshape(h, b * n, d)
            codes = cpu_decode.encode(flat, self._encode_tiles, tables.bias[:, 0])
            return codes.reshape(h, b, n).transpose(0, 1)
        return kernel.encode_torch(keys_pre, tables)

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
        self._codes_buffer(state, b, h)[:, :, start : start + count] = self.encode(undo_rope_keys(keys_post, cos, sin, self.layout))

    def bucket_index(self, state: Any, length: int, device: torch.device) -> tuple[torch.Tensor, int]:
        """Offsets into one (sample, KV head)'s score table for this step: ``(offsets, used)``.

        For row ``j < length`` (t = length - 1), ``offsets [length]`` (int64, what ``gather`` takes) is
        ``bucket(t - j) * C``, the start of row ``j``'s bucket inside a ``[used * C]`` table; ``used`` is the
        number of buckets in use. The same for every layer of a step, so computed once per step and shared.
        """

        def compute() -> tuple[torch.Tensor, int]:
            bucket = self.buckets.row_buckets(length, device)
            used = int(bucket.max()) + 1 if length else 1
            return bucket.long() * self.codes_size, used

        return state.step.shared(("bucket_offsets", self.buckets, self.codes_size, length, device), compute)

    def tables(self, q_pre: torch.Tensor, used: int) -> torch.Tensor:
        """``[B, Hkv, G', used * C]`` score tables (``G' = 1`` for ``sum``) in ``score_dtype``
        (:func:`~a2ats_tools.kernels.score_select.build_tables`, the codebook kept in each dtype it is read in)."""
        dtype = resolve_score_dtype(self.settings.score_dtype, q_pre.device)
        emulate = dtype == torch.bfloat16 and q_pre.device.type == "cpu" and not cpu_has_native_bf16()
        codebook = self._scoring_codebooks.get(dtype)
        if codebook is None or codebook.device != q_pre.device:
            codebook = self.codebook_t.to(q_pre.device, dtype)
            self._scoring_codebooks[dtype] = codebook = codebook.float() if emulate else codebook
        return build_tables(
            q_pre, codebook, self.cos[:used], self.sin[:used], self.settings.aggregation, dtype, emulate, self.layout
        )

    def scores(self, state, q_pre, q_post, length):
        codes = self._codes_buffer(state, q_pre.shape[0], self.num_kv_heads)  # pending (windowed) rows: stale codes
        offsets, used = self.bucket_index(state, length, q_pre.device)
        table = self.tables(q_pre, used)
        backend = "triton" if use_triton(self.settings.kernels, table, codes) else "torch"
        return score(table, codes, offsets, self.settings.aggregation, self.scale, backend)

    def fused_decode(self, state, q_post, rope, length, valid, scale):
        """The fused CPU kernel (``kernels/cpu_decode``: scoring queries, tables, top-K, re-rank and attention in
        one call) where it applies: ``kernels`` auto or cpu with everything on the CPU (:func:`use_cpu_kernel`),
        float32 K/V and score tables, no padding or left padding, a codebook size divisible by 16 whose codes
        fit int16 (the kernel's codes), and a rotation the kernel implements (:func:`fused_kernel_refusal`)."""
        if self.fused_refusal is not None or not use_cpu_kernel(self.settings.kernels, state.keys, q_post):
            return None
        if (
            state.keys.dtype != torch.float32
            or self.codes_size % 16
            or self.code_dtype != torch.int16
            or resolve_score_dtype(self.settings.score_dtype, q_post.device) != torch.float32
        ):
            return None
        plan = self._step_plan(state, rope, length, valid)
        if plan is None:
            return None
        from ...kernels import cpu_decode

        if self._codebook_tiles is None:
            self._codebook_tiles = cpu_decode.codebook_tiles(self.codebook_t.transpose(1, 2))
        used = plan.offsets_used
        out, picked, rows_read = cpu_decode.decode_layer(
            plan.kernel, q_post.float(), self.cos[:used], self.sin[:used], self._codebook_tiles,
            self._codes_buffer(state, q_post.shape[0], self.num_kv_heads), state.keys, state.values, scale,
        )
        state.store_read_bytes += rows_read * state.keys.shape[-1] * state.keys.element_size()
        return out, picked

    def _step_plan(self, state, rope, length: int, valid: torch.Tensor) -> _FusedPlan | None:
        """The fused kernel's per-step arguments (None: padding other than left padding), built by the first
        layer of a step and shared by the others (same rotary factors, mask and settings)."""
        key = ("fused_plan", length, self.codes_size, self.settings)
        return state.step.shared(key, lambda: self._plan(state, rope, length, valid), rope[0], rope[1], valid)

    def _plan(self, state, rope, length: int, valid: torch.Tensor) -> _FusedPlan | None:
        padding = self.left_padding(state, valid, length)
        if padding is None:
            return None
        from ...kernels import cpu_decode

        offsets, used = self.bucket_index(state, length, valid.device)
        b = valid.shape[0]
        cos, sin = (t.float().expand(b, -1) for t in rope)  # [1, d] where the batch shares positions
        first, top = padding
        s = self.settings
        kernel = cpu_decode.plan_step(
            cos, sin, offsets, length, s.n_sink, s.window, top, s.rerank, s.rerank_aggregation, first=first,
            aggregation=s.aggregation,
        )
        return _FusedPlan(kernel, used)
