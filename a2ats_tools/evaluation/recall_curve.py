"""Retrieval quality on held-out text: attention-mass recall and top-K recall against exact attention, per
layer and overall, for each method and budget.

Queries and keys are captured pre-RoPE with the calibration capture (:mod:`a2ats_tools.calibration.capture`).
Each layer's keys fill a cache state as a prefill would (the A²ATS selector encodes them with the checkpoint's
codebooks, Quest keeps its page bounds), and every method is the runtime's own selector, asked at each query
position for the rows it keeps, over the cache as it stands at that position:

* ``a2ats``: the ``a2ats`` selector with the runtime's settings (distance buckets, then exact re-ranking with
  ``rerank`` and ``rerank_aggregation``; rerank 0 turns it off);
* ``norerank``: the same without re-ranking (the ablation of re-ranking);
* ``wrope``: the paper's single-distance WRoPE (2048) over the same VQ codes, without re-ranking;
* ``quest``: the ``quest`` selector (page min/max bounds of the post-RoPE keys);
* ``streaming``: the ``streaming`` selector (sinks plus the most recent tokens, the same budget);
* ``oracle``: the ``exact`` selector (top-K by exact logits: the upper bound for the budget).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import DataError
from ..rope import WROPE_DISTANCE, DistanceBuckets, Rotary
from ..runtime.cache import LayerState
from ..runtime.selectors import SELECTOR_CLASSES, A2atsSelector, TokenSelector
from ..runtime.settings import RuntimeSettings
from ..runtime.step import StepContext
from ..selection import chosen_mask

RECALL_METHODS: tuple[str, ...] = ("a2ats", "norerank", "wrope", "quest", "streaming", "oracle")


@dataclass
class Captured:
    """Pre-RoPE queries ``[Hq, T, d]`` and keys ``[Hkv, T, d]`` of one sequence, per retrieved layer (keyed by
    layer index)."""

    queries: dict[int, torch.Tensor]
    keys: dict[int, torch.Tensor]


@torch.no_grad()
def capture_sequence(model: Any, ids: list[int]) -> Captured:
    """Run ``ids`` through ``model`` once, recording every retrieved layer's pre-RoPE queries and keys."""
    from ..calibration.capture import capturing

    qs: dict[int, torch.Tensor] = {}
    ks: dict[int, torch.Tensor] = {}

    def sink(layer: int, q: torch.Tensor, k: torch.Tensor) -> None:
        qs[layer], ks[layer] = q[0].cpu(), k[0].cpu()

    device = next(model.parameters()).device
    with capturing(model, sink):
        model(input_ids=torch.tensor([ids], device=device), use_cache=False, logits_to_keep=1)
    return Captured(qs, ks)


def heldout_ids(tokenizer: Any, length: int, seed: int, path: str | Path | None = None) -> list[int]:
    """``length`` tokens of held-out text: a user file, or Python's documentation topics shuffled with ``seed``."""
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise DataError(f"held-out text file {p} does not exist")
        texts = [p.read_text(encoding="utf-8", errors="replace")]
    else:
        from ..calibration.sources import pydoc_texts

        texts = pydoc_texts()
        random.Random(seed).shuffle(texts)
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if len(ids) >= length:
            return ids[:length]
    if len(ids) < length:
        raise DataError(f"the held-out text has only {len(ids)} tokens; {length} are needed")
    return ids


def query_positions(length: int, count: int, window: int) -> torch.Tensor:
    """``count`` query positions spread evenly over the second half of the sequence (beyond the window)."""
    lo = max(length // 2, min(window * 2, length - 1))
    return torch.linspace(lo, length - 1, count).round().long().unique()


METHOD_SELECTORS: dict[str, tuple[str, dict[str, Any]]] = {  # method -> (selector, settings it changes)
    "a2ats": ("a2ats", {}),
    "norerank": ("a2ats", {"rerank": 0}),
    "wrope": ("a2ats", {"rerank": 0, "buckets": DistanceBuckets.single(WROPE_DISTANCE)}),
    "quest": ("quest", {}),
    "streaming": ("streaming", {}),
    "oracle": ("exact", {}),
}


def method_selector(
    method: str, settings: RuntimeSettings, layer: int, geometry: tuple[int, int, int], codebook: torch.Tensor,
    whitening: torch.Tensor, rotary: Rotary, scale: float,
) -> TokenSelector:
    """The runtime selector that ``method`` measures, for one layer (``geometry``: query heads, KV heads, head dim)."""
    if method not in METHOD_SELECTORS:
        raise ValueError(f"unknown recall method {method!r}; choose from {', '.join(METHOD_SELECTORS)}")
    name, changes = METHOD_SELECTORS[method]
    chosen = settings.with_overrides(selector=name, kernels="torch", **changes)
    cls = SELECTOR_CLASSES[name]
    if issubclass(cls, A2atsSelector):
        selector = cls(chosen, layer, *geometry, codebook=codebook, whitening=whitening, rotary=rotary)
    else:
        selector = cls(chosen, layer, *geometry, layout=rotary.layout)
    selector.scale = scale
    return selector


def prefilled_state(keys_pre: torch.Tensor, rotary: Rotary, selectors: Sequence[TokenSelector]) -> LayerState:
    """A one-sample cache state holding ``keys_pre [Hkv, N, d]`` (stored post-RoPE), with the metadata of each of
    ``selectors`` (each keeps its own entries of ``meta``) built by its prefill hook."""
    n = keys_pre.shape[1]
    cos, sin = rotary.cos_sin(torch.arange(n))
    pre = keys_pre.float().unsqueeze(0)
    post = rotary.apply(pre, cos, sin)
    state = LayerState()
    state.keys, state.values, state.length, state.capacity = post, post, n, n
    for selector in selectors:
        selector.on_prefill(state, pre, post, 0)
    return state


def recall_curve(
    captured: Sequence[Captured],
    codebooks: Mapping[int, torch.Tensor],
    whitening: Mapping[int, torch.Tensor],
    rotary: Rotary,
    settings: RuntimeSettings,
    budgets: Sequence[float | int],
    *,
    methods: Sequence[str] = RECALL_METHODS,
    queries_per_sequence: int = 16,
    scale: float | None = None,
    progress: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Mass and top-K recall per method, budget and layer (means over query heads, queries and sequences).

    ``settings``: the runtime settings the methods share (sinks, window, buckets, aggregation, re-ranking); each
    budget of ``budgets`` replaces its budget. ``scale`` is the model's softmax scale (its attention modules'
    ``scaling``; None: ``head_dim**-0.5``): it weighs the attention mass and the re-ranking's group softmax, as in
    the runtime. Top-K recall is the share of the exact top rows (the ``exact`` selector by summed logits, the same
    budget) that a method keeps.

    Returns ``{"methods": [...], "budgets": [...], "layers": [retrieved layer indices], "per_layer": {method:
    {budget: {"mass": [L], "topk": [L]}}} (one entry per retrieved layer), "overall": {method: {budget: {"mass": x,
    "topk": y}}}}`` (budget keys as strings).
    """
    layers = sorted(codebooks)
    n_layers = len(layers)
    sums: dict[tuple[str, str, str], list[float]] = {}
    counts = 0
    for seq in captured:
        counts += 1
        for slot, layer in enumerate(layers):
            for (method, budget, metric), value in layer_recall(
                seq.queries[layer].float(), seq.keys[layer].float(), codebooks[layer], whitening[layer], rotary,
                settings, budgets, methods, queries_per_sequence, scale, layer,
            ).items():
                sums.setdefault((method, budget, metric), [0.0] * n_layers)[slot] += value
            if progress is not None:
                progress()
    per_layer: dict[str, dict[str, dict[str, list[float]]]] = {}
    overall: dict[str, dict[str, dict[str, float]]] = {}
    for (method, budget, metric), values in sums.items():
        layer_means = [v / max(counts, 1) for v in values]
        per_layer.setdefault(method, {}).setdefault(budget, {})[metric] = layer_means
        overall.setdefault(method, {}).setdefault(budget, {})[metric] = sum(layer_means) / n_layers
    return {"methods": list(methods), "budgets": [str(b) for b in budgets], "layers": layers, "per_layer": per_layer,
            "overall": overall}


def layer_recall(
    queries: torch.Tensor, keys: torch.Tensor, codebook: torch.Tensor, whitening: torch.Tensor, rotary: Rotary,
    settings: RuntimeSettings, budgets: Sequence[float | int], methods: Sequence[str], queries_per_sequence: int,
    scale: float | None, layer: int,
) -> dict[tuple[str, str, str], float]:
    """``{(method, budget, "mass" | "topk"): mean over query heads and positions}`` of one layer of one sequence:
    ``queries [Hq, N, d]`` and ``keys [Hkv, N, d]`` pre-RoPE."""
    hq, n, d = queries.shape
    geometry = (hq, keys.shape[0], d)
    softmax_scale = scale if scale is not None else d**-0.5
    chosen = {(m, b): method_selector(m, settings.with_overrides(budget=b), layer, geometry, codebook, whitening,
                                      rotary, softmax_scale) for m in methods for b in budgets}
    truth = {b: method_selector("oracle", settings.with_overrides(budget=b, aggregation="sum"), layer, geometry,
                                codebook, whitening, rotary, softmax_scale) for b in budgets}
    builders = {type(s): s for s in chosen.values()}  # one selector of each class fills the state's metadata
    state = prefilled_state(keys, rotary, list(builders.values()))
    positions = query_positions(n, queries_per_sequence, settings.window)
    cos, sin = rotary.cos_sin(positions)
    q_post_all = rotary.apply(queries[:, positions].float(), cos, sin)  # [Hq, M, d]
    out: dict[tuple[str, str, str], float] = {}
    for i, t in enumerate(positions.tolist()):
        length = t + 1
        q_pre, q_post = queries[None, :, t], q_post_all[None, :, i]
        valid = torch.ones(1, length, dtype=torch.bool)
        logits = (q_post_all[:, i : i + 1] @ state.keys[0, :, :length].repeat_interleave(hq // keys.shape[0], 0)
                  .transpose(1, 2))[:, 0]  # [Hq, length]
        probs = torch.softmax(logits * softmax_scale, -1)
        state.step = StepContext()  # what one query position derives is shared by its selectors only
        exact_top = {b: _rows(truth[b], state, q_pre, q_post, length, valid, hq) for b in budgets}
        for (method, budget), selector in chosen.items():
            rows = _rows(selector, state, q_pre, q_post, length, valid, hq)
            top = exact_top[budget]
            values = {"mass": float((probs * rows).sum(-1).mean()),
                      "topk": float(((rows & top).sum(-1).float() / top.sum(-1).clamp_min(1)).mean())}
            for metric, value in values.items():
                key = (method, str(budget), metric)
                out[key] = out.get(key, 0.0) + value / len(positions)
    return out


def _rows(
    selector: TokenSelector, state: LayerState, q_pre: torch.Tensor, q_post: torch.Tensor, length: int,
    valid: torch.Tensor, num_heads: int,
) -> torch.Tensor:
    """``[Hq, length]`` bool: the rows ``selector`` keeps at this position, spread over each group's query heads."""
    kept = chosen_mask(selector.select(state, q_pre, q_post, length, valid), length)[0]  # [Hkv, length]
    return kept.repeat_interleave(num_heads // kept.shape[0], 0)
