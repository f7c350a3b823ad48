"""A converted checkpoint's retrieval attention over a paged KV cache, for a serving engine.

The engine owns the weights, the scheduler and the cache pool; this owns what A²ATS adds to each retrieved
(full-attention) layer: the codes of every key as it enters the pool (:meth:`LayerRetrieval.encode`), and the
decode step (:meth:`LayerRetrieval.decode`). Both run the transformers runtime's own selector (built by
:class:`~a2ats_tools.runtime.loader.A2atsRuntime` from the model's definition and the checkpoint's artifacts),
so sinks, window, distance buckets, per-KV-head budget and exact re-ranking are the same rules in both engines.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch

from ..artifacts.checkpoint import read_codebooks, read_config
from ..errors import A2atsError
from ..kernels.sparse_attention import sparse_decode_torch
from ..models import model_skeleton, rotary
from ..rope import Rotary, undo_rope, undo_rope_keys
from ..runtime.cache import LayerState
from ..runtime.loader import A2atsRuntime, check_artifacts
from ..runtime.selectors import TokenSelector
from ..runtime.settings import RuntimeSettings, parse_overrides
from ..runtime.step import StepContext
from ..selection import Selection
from .paged import CodeStore, DecodeRows, PagedRows

SETTINGS_ENV = "A2ATS_SETTINGS"  # runtime overrides for a served checkpoint: "budget=5%,rerank=2"
SHORTCUT_ENV = "A2ATS_DENSE_WHEN_COVERED"  # "0": select even where the budget covers the whole context
_LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def layer_index(layer_name: str) -> int:
    """The decoder layer index in an engine's module name (``model.layers.3.self_attn.attn`` -> 3)."""
    found = _LAYER_INDEX.search(layer_name)
    if found is None:
        raise A2atsError(f"cannot tell the decoder layer of attention module {layer_name!r}")
    return int(found.group(1))


class LayerRetrieval:
    """One retrieved layer: its selector, the rotary embedding that rotated its keys, and the decode step."""

    def __init__(self, selector: TokenSelector, rot: Rotary, dense_when_covered: bool = True):
        self.selector = selector
        self.rotary = rot
        self.dense_when_covered = dense_when_covered

    def new_code_store(self, num_slots: int, device: torch.device | str = "cpu") -> CodeStore:
        return CodeStore(num_slots, self.selector.num_kv_heads, self.selector.code_dtype, device)

    @torch.no_grad()
    def encode(self, store: CodeStore, keys_post: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor) -> None:
        """Codes of new keys ``[T, Hkv, d]`` (post-RoPE, as the engine caches them) at ``positions [T]``, written
        at ``slots [T]``: RoPE undone with the model's own factors at those positions, then encoded once."""
        if keys_post.shape[0] == 0:
            return
        cos, sin = self.rotary.cos_sin(positions.to(keys_post.device))  # [T, r]
        keys_pre = undo_rope_keys(keys_post.transpose(0, 1)[None], cos[None], sin[None], self.selector.layout)
        store.write(slots, self.selector.encode(keys_pre)[0].transpose(0, 1))

    @torch.no_grad()
    def decode(
        self, q_post: torch.Tensor, keys: PagedRows, values: PagedRows, store: CodeStore, step: StepContext,
        scale: float, softcap: float | None = None,
    ) -> tuple[torch.Tensor, Selection] | None:
        """Retrieval attention for one query per request ``q_post [B, Hq, d]`` over the rows ``keys``/``values``
        describe: ``(out [B, Hq, d], selection)``, or None where the budget keeps every row of every request
        (dense attention gives the same result; the engine's own kernel is faster there). ``step``: shared by
        the layers of one engine step (the per-step budget and bucket offsets are derived once)."""
        rows: DecodeRows = keys.rows
        width = rows.width
        state = LayerState()
        state.keys, state.values, state.length, state.capacity = keys, values, width, width
        state.device, state.step = q_post.device, step
        state.meta["codes"] = store.read(rows)
        selector = self.selector
        selector.scale = scale
        if self.dense_when_covered and selector.keeps_everything(state, rows.valid, width):
            return None
        cos, sin = self.rotary.cos_sin(rows.positions)  # [B, r]: each query's own position
        q_pre = undo_rope(q_post.float(), cos[:, None], sin[:, None], selector.layout)
        chosen = selector.select(state, q_pre, q_post, width, rows.valid)
        out = sparse_decode_torch(q_post, keys, values, chosen.indices, chosen.keep, scale, chosen.logits, softcap)
        return out, chosen


class ServedCheckpoint:
    """What a serving engine needs of a converted checkpoint directory: one :class:`LayerRetrieval` per retrieved
    layer (None for the windowed layers, which the engine serves densely), built once per process.

    Settings come from ``a2ats_config.json``, then the ``A2ATS_SETTINGS`` environment variable (the CLI's
    ``KEY=VALUE`` syntax, e.g. ``budget=5%,rerank=2``), so that an engine's worker processes all see them.
    """

    def __init__(self, directory: str | Path, overrides: dict[str, Any] | None = None):
        directory = Path(directory)
        config = read_config(directory)
        env = os.environ.get(SETTINGS_ENV, "").strip()
        merged = {**(parse_overrides(env) if env else {}), **(overrides or {})}
        merged.setdefault("kernels", "torch")  # the engine's cache is paged: the selectors' torch paths read it
        settings = RuntimeSettings.from_config(config, **merged)
        if settings.offload is not None:
            raise A2atsError("offload is the serving engine's to manage (its KV cache pool); leave it unset")
        model = model_skeleton(directory)
        check_artifacts(config, model)
        codebooks, whitening = read_codebooks(directory, config)
        runtime = A2atsRuntime(model, config, codebooks, whitening, settings, device=torch.device("cpu"))
        rot = rotary(model)
        covered = os.environ.get(SHORTCUT_ENV, "1").strip() != "0"
        self.settings = settings
        self.layers: list[LayerRetrieval | None] = [
            None if sel is None or sel.dense else LayerRetrieval(sel, rot, covered) for sel in runtime.selectors()
        ]

    def layer(self, layer_name: str) -> LayerRetrieval | None:
        """The retrieval of the engine's attention module ``layer_name`` (None: served densely)."""
        index = layer_index(layer_name)
        if index >= len(self.layers):
            raise A2atsError(f"attention module {layer_name!r} is beyond the checkpoint's {len(self.layers)} layers")
        return self.layers[index]
