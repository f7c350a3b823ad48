"""A preallocated KV cache whose layers feed a token selector as keys arrive.

Capacity starts at the prompt plus 1/8 headroom, or at exactly what the caller reserved (``generate`` reserves
prompt + ``max_new_tokens``), and then doubles (no concatenation per step). Keys are stored post-RoPE (what
exact attention needs); the selector sees each new key once, with the cos/sin that rotated it (stashed by the
attention pre-hook): a prefill chunk's keys already taken back to pre-RoPE form (``on_prefill``), a decode
step's as they are (``on_decode_append``, which undoes RoPE when the selector needs it). With
``offload="cpu"`` the full K/V live in host memory (pinned when CUDA is present); the selector's metadata
(codes) stays on the compute device and decode moves only selected rows.

Only full-attention layers are :class:`A2atsLayer` s. A sliding or chunked layer keeps transformers' own
bounded cache layer of its window (``DynamicSlidingWindowLayer``) and attends to all of it, as the model does.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import Cache
from transformers.cache_utils import CacheLayerMixin, DynamicSlidingWindowLayer

from ..rope import undo_rope_keys
from .selectors import TokenSelector
from .step import StepContext

HEADROOM = 64  # rows; the first allocation holds the prompt plus max(64, prompt/8) rows


class LayerState:
    """What a selector may read: buffers, length, capacity, compute device, its own ``meta`` dict, and ``step``,
    the :class:`StepContext` the layers of the current step share (the cache's, once it runs a step)."""

    def __init__(self) -> None:
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None
        self.length = 0
        self.capacity = 0
        self.device = torch.device("cpu")
        self.meta: dict[str, Any] = {}
        self.step = StepContext()
        # K/V traffic of the store (host memory when offloaded): bytes appended, and bytes read: all of it by
        # dense attention (prefill, short contexts), the candidates' keys and kept rows' values by a retrieval
        # step on the CPU paths (torch and fused; Triton reads device-resident K/V and is not counted)
        self.store_write_bytes = 0
        self.store_read_bytes = 0


class A2atsLayer(CacheLayerMixin):
    """One decoder layer's cache: preallocated post-RoPE K/V plus the selector's metadata."""

    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, selector: TokenSelector, offload: str | None = None, reserve: int | None = None):
        super().__init__()
        self.selector = selector
        self.offload_to = offload
        self.reserve = reserve  # rows for the first allocation (None: the prompt plus headroom)
        self.state = LayerState()
        self.rope: tuple[torch.Tensor, torch.Tensor] | None = None  # this step's (cos, sin), set by the pre-hook
        self._selection: tuple[torch.Tensor, torch.Tensor] | torch.Tensor | None = None

    @property
    def last_selection(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The last decode step's rows, for inspection: ``(indices, keep)`` ``[B, Hkv, K]`` (None before one)."""
        sel = self._selection
        if isinstance(sel, torch.Tensor):  # the fused kernel's rows, -1 where a sample keeps fewer
            return sel.clamp_min(0), sel >= 0
        return sel

    @last_selection.setter
    def last_selection(self, rows: tuple[torch.Tensor, torch.Tensor] | torch.Tensor | None) -> None:
        """``(indices, keep)``, or one ``[B, Hkv, K]`` tensor of rows padded with -1 (turned into that on access)."""
        self._selection = rows

    # --- storage ---------------------------------------------------------------------------------------------
    def _storage_device(self, device: torch.device) -> torch.device:
        return torch.device("cpu") if self.offload_to == "cpu" else device

    def _allocate(self, like: torch.Tensor, capacity: int) -> torch.Tensor:
        b, h, _, d = like.shape
        device = self._storage_device(like.device)
        pin = device.type == "cpu" and torch.cuda.is_available() and like.device.type == "cuda"
        return torch.empty(b, h, capacity, d, dtype=like.dtype, device=device, pin_memory=pin)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.state.device = key_states.device
        self.is_initialized = True

    def _ensure_capacity(self, key_states: torch.Tensor, value_states: torch.Tensor, needed: int) -> None:
        st = self.state
        if needed <= st.capacity:
            return
        if st.capacity == 0 and self.reserve is not None and self.reserve >= needed:
            capacity = self.reserve  # the caller knows how long this cache gets (prompt + new tokens)
        elif st.capacity == 0:  # first fill (the prompt): a little headroom for decoding, then doubling
            capacity = -(-(needed + max(HEADROOM, needed // 8)) // HEADROOM) * HEADROOM
        else:
            capacity = st.capacity * 2
            while capacity < needed:
                capacity *= 2
        keys, values = self._allocate(key_states, capacity), self._allocate(value_states, capacity)
        if st.length:
            keys[:, :, : st.length] = st.keys[:, :, : st.length]
            values[:, :, : st.length] = st.values[:, :, : st.length]
        st.keys, st.values, st.capacity = keys, values, capacity
        self.keys, self.values = keys, values

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Append ``[B, Hkv, n, d]`` post-RoPE keys/values; return views of the whole cache (host views if offloaded)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        st = self.state
        start, n = st.length, key_states.shape[-2]
        self._ensure_capacity(key_states, value_states, start + n)
        # a plain copy_: from the device into host (offloaded) rows it waits for the transfer, since the host may
        # read these rows at once (the step's attention, a deferred encode); a non_blocking .to() would hand a
        # pinned buffer that the copy may not have filled yet
        st.keys[:, :, start : start + n].copy_(key_states)
        st.values[:, :, start : start + n].copy_(value_states)
        st.store_write_bytes += key_states.numel() * st.keys.element_size() + value_states.numel() * st.values.element_size()
        st.length = start + n
        if self.rope is None:
            raise RuntimeError("A²ATS cache updated without the attention pre-hook (call runtime.attach first)")
        cos, sin = self.rope
        if n > 1:
            keys_pre = undo_rope_keys(key_states, cos[:, -n:], sin[:, -n:], self.selector.layout)
            self.selector.on_prefill(st, keys_pre, key_states, start)
        else:  # the selector undoes RoPE when it needs to (A²ATS: once per block of steps)
            self.selector.on_decode_append(st, key_states, (cos[:, -n:], sin[:, -n:]), start)
        return st.keys[:, :, : st.length], st.values[:, :, : st.length]

    # --- sizes ---------------------------------------------------------------------------------------------
    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.state.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.state.length

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.state = LayerState()
        self.keys = self.values = None
        self.is_initialized = False

    def _map_batch(self, fn) -> None:
        st = self.state
        if st.keys is None:
            return
        st.keys, st.values = fn(st.keys), fn(st.values)
        for name, t in list(st.meta.items()):
            if isinstance(t, torch.Tensor) and t.dim() > 0:
                st.meta[name] = fn(t)
        self.keys, self.values = st.keys, st.values

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: keep the rows of ``beam_idx`` (K/V and the selector's metadata)."""
        self._map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_batch(lambda t: t[indices.to(t.device)])

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def device_bytes(self) -> int:
        """Bytes this layer holds on the compute device (K/V buffers unless offloaded, plus selector metadata)."""
        total = sum(t.numel() * t.element_size() for t in self.state.meta.values() if isinstance(t, torch.Tensor))
        if self.offload_to is None:  # offloaded K/V are the host store, even when host and device coincide
            for t in (self.state.keys, self.state.values):
                if t is not None:
                    total += t.numel() * t.element_size()
        return total


class A2atsCache(Cache):
    """A transformers ``Cache`` of :class:`A2atsLayer` s (full-attention layers) and sliding-window layers (the
    others); pass it as ``cache=`` (``past_key_values=`` before transformers 5.24; ``generate`` builds one)."""

    def __init__(
        self,
        selectors: list[TokenSelector | None],
        offload: str | None = None,
        reserve: int | None = None,
        windows: list[int | None] | None = None,
    ):
        """``selectors``: one per layer, None for a windowed layer, whose window ``windows`` gives.
        ``reserve``: rows to allocate at the first update when they suffice (the final length, if known)."""
        windows = windows or [None] * len(selectors)
        layers: list[CacheLayerMixin] = []
        for sel, window in zip(selectors, windows, strict=True):
            if sel is None:
                if window is None:
                    raise ValueError("a layer without a selector needs its attention window")
                layers.append(DynamicSlidingWindowLayer(sliding_window=window))
            else:
                layers.append(A2atsLayer(sel, offload, reserve))
        super().__init__(layers=layers)
        self.step = StepContext()

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Layer 0's update opens a step: every layer gets a fresh shared :class:`StepContext`."""
        if layer_idx == 0:
            self.new_step()
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def new_step(self) -> StepContext:
        """Drop what the last step derived and give every layer one new context to share."""
        self.step = StepContext()
        for layer in self.layers:
            if isinstance(layer, A2atsLayer):
                layer.state.step = self.step
        return self.step

    def set_rope(self, layer_idx: int, cos: torch.Tensor, sin: torch.Tensor) -> None:
        """This step's rotary factors for a retrieved layer (windowed layers need none)."""
        layer = self.layers[layer_idx]
        if isinstance(layer, A2atsLayer):
            layer.rope = (cos, sin)

    def store_traffic(self) -> tuple[int, int]:
        """``(bytes read, bytes written)`` of the retrieved layers' K/V stores so far (:class:`LayerState`): with
        ``offload="cpu"`` on a GPU, what crossed between host and device; everywhere, what a step reads of the
        cache instead of all of it."""
        states = [layer.state for layer in self.layers if isinstance(layer, A2atsLayer)]
        return sum(s.store_read_bytes for s in states), sum(s.store_write_bytes for s in states)

    def device_bytes(self) -> int:
        total = 0
        for layer in self.layers:
            if isinstance(layer, A2atsLayer):
                total += layer.device_bytes()
            elif layer.is_initialized:
                total += sum(t.numel() * t.element_size() for t in (layer.keys, layer.values))
        return total
