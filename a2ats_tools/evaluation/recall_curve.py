"""Retrieval quality on held-out text: attention-mass recall and top-K recall against exact attention, per
layer and overall, for each method and budget.

Queries and keys are captured pre-RoPE with the calibration capture (:mod:`a2ats_tools.calibration.capture`),
keys are encoded with the checkpoint's codebooks (nearest whitened centroid, :func:`kernels.encode`), and
every method is scored with the reference semantics of :mod:`a2ats_tools.scoring`:

* ``a2ats``: our default, the checkpoint's distance buckets over the VQ keys, then exact re-ranking: the
  ``rerank``·K best tokens by approximate score are fetched and the K best of them by exact score kept (the
  runtime's ``rerank`` and ``rerank_aggregation`` settings; rerank 0 turns it off);
* ``norerank``: the approximate scores alone (the ablation of re-ranking);
* ``wrope``: the paper's single-distance WRoPE (2048) over the same VQ keys;
* ``quest``: page min/max bounds of the exact post-RoPE keys (pages of 16);
* ``streaming``: sinks plus the most recent tokens (the window enlarged to the same budget);
* ``oracle``: exact logits (the upper bound for the budget).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import DataError
from ..kernels.encode import encode, prepare_codebook
from ..rope import DistanceBuckets, Rotary, apply_rope
from ..runtime.settings import RuntimeSettings
from ..scoring import (
    SelectionPolicy,
    bucketed_scores,
    exact_logits,
    forced_mask,
    group_aggregate,
    mass_recall,
    select,
)
from .baselines import quest_token_scores

RECALL_METHODS: tuple[str, ...] = ("a2ats", "norerank", "wrope", "quest", "streaming", "oracle")


@dataclass
class Captured:
    """Pre-RoPE queries ``[Hq, T, d]`` and keys ``[Hkv, T, d]`` of one sequence, per layer."""

    queries: list[torch.Tensor]
    keys: list[torch.Tensor]


@torch.no_grad()
def capture_sequence(model: Any, ids: list[int]) -> Captured:
    """Run ``ids`` through ``model`` once, recording every layer's pre-RoPE queries and keys."""
    from ..calibration.capture import capturing

    n_layers = model.config.get_text_config().num_hidden_layers
    qs: list[torch.Tensor | None] = [None] * n_layers
    ks: list[torch.Tensor | None] = [None] * n_layers

    def sink(layer: int, q: torch.Tensor, k: torch.Tensor) -> None:
        qs[layer], ks[layer] = q[0].cpu(), k[0].cpu()

    device = next(model.parameters()).device
    with capturing(model, sink):
        model(input_ids=torch.tensor([ids], device=device), use_cache=False, logits_to_keep=1)
    return Captured([q for q in qs if q is not None], [k for k in ks if k is not None])


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


def topk_recall(
    true_logits: torch.Tensor, approx: torch.Tensor | None, q_pos: torch.Tensor, policy: SelectionPolicy,
    num_kv_heads: int,
) -> torch.Tensor:
    """Share of the exact top-(sinks+window+K) tokens (group-aggregated per KV head) that the method selects ``[Hkv, M]``."""
    hq, m, n = true_logits.shape
    valid = torch.arange(n).reshape(1, n) <= q_pos.reshape(m, 1)
    exact = group_aggregate(true_logits.masked_fill(~valid, float("-inf")).transpose(0, 1), num_kv_heads, "sum")
    source = exact if approx is None else group_aggregate(
        approx.masked_fill(~valid, float("-inf")).transpose(0, 1), num_kv_heads, policy.aggregation
    )
    out = []
    for i in range(m):
        ctx = int(q_pos[i]) + 1
        t_idx, t_keep = select(exact[i], valid[i], policy, context=ctx)
        s_idx, s_keep = select(source[i], valid[i], policy, context=ctx)
        truth = torch.zeros(num_kv_heads, n, dtype=torch.bool).scatter_(1, t_idx, t_keep)
        got = torch.zeros(num_kv_heads, n, dtype=torch.bool).scatter_(1, s_idx, s_keep)
        out.append((truth & got).sum(-1).float() / truth.sum(-1).clamp_min(1).float())
    return torch.stack(out, 1)


def reranked_scores(
    true_logits: torch.Tensor, approx: torch.Tensor, q_pos: torch.Tensor, policy: SelectionPolicy,
    num_kv_heads: int, factor: float, rerank_aggregation: str = "sum", scale: float = 1.0,
) -> torch.Tensor:
    """Scores ``[Hq, M, N]`` whose selection under ``policy`` is ``approx`` with exact re-ranking.

    Per KV head, the ``ceil(factor·K)`` best non-forced tokens by group-aggregated ``approx`` are the
    candidates; every other token scores 0, and a candidate scores so that the top-K are the candidates with
    the best exact score (the same rows the runtime's ``rerank`` keeps): for ``rerank_aggregation="sum"`` its
    exact logit shifted to be >= 1 (``policy`` then sums the group's logits; for ``"max"`` the group's largest,
    spread evenly over its heads); for ``"softmax"`` the group's
    summed softmax probability, each head normalised over candidates + forced tokens (``scale`` is the
    attention scale), spread evenly over the group's heads plus 1/G (so that ``policy``'s sum restores it).
    """
    hq, m, n = true_logits.shape
    g = hq // num_kv_heads
    valid = torch.arange(n).reshape(1, n) <= q_pos.reshape(m, 1)
    agg = group_aggregate(approx.masked_fill(~valid, float("-inf")).transpose(0, 1), num_kv_heads, policy.aggregation)
    out = torch.zeros_like(true_logits, dtype=torch.float32)
    for i in range(m):
        ctx = int(q_pos[i]) + 1
        forced = forced_mask(valid[i], policy.n_sink, policy.window)
        fetch = min(n, math.ceil(policy.budget_tokens(ctx) * factor))
        vals, cand = torch.topk(agg[i].masked_fill(forced, float("-inf")), fetch, dim=-1)
        picked = torch.zeros(num_kv_heads, n, dtype=torch.bool).scatter_(1, cand, vals > float("-inf"))
        t = true_logits[:, i].float()
        if rerank_aggregation == "softmax":
            pool = (picked | forced).repeat_interleave(g, 0)  # what the runtime's candidate softmax sees
            probs = torch.softmax(t.masked_fill(~pool, float("-inf")) * scale, -1)
            mass = probs.reshape(num_kv_heads, g, n).sum(1)  # [Hkv, N]
            value = ((mass + 1.0) / g).repeat_interleave(g, 0)
        elif rerank_aggregation == "sum":
            value = t - t.masked_fill(~valid[i], float("inf")).amin(-1, keepdim=True) + 1.0
        elif rerank_aggregation == "max":  # the group's largest logit, shifted by one constant per group
            grouped = t.reshape(num_kv_heads, g, n)
            low = grouped.masked_fill(~valid[i], float("inf")).amin((1, 2), keepdim=True)
            value = ((grouped.amax(1, keepdim=True) - low + 1.0) / g).expand(-1, g, -1).reshape(hq, n)
        else:
            raise ValueError(f"unknown rerank_aggregation {rerank_aggregation!r}")
        picked = picked.repeat_interleave(g, 0)
        out[:, i] = torch.where(picked, value, torch.zeros_like(t))
    return out


def method_scores(
    method: str, q: torch.Tensor, q_pos: torch.Tensor, keys: torch.Tensor, keys_vq: torch.Tensor | None,
    rotary: Rotary, buckets: DistanceBuckets, num_kv_heads: int,
) -> tuple[torch.Tensor | None, Callable[[SelectionPolicy], SelectionPolicy]]:
    """Approximate scores ``[Hq, M, N]`` of ``method`` (None = exact) and how it adapts the policy."""
    same: Callable[[SelectionPolicy], SelectionPolicy] = lambda p: p  # noqa: E731
    n = keys.shape[1]
    if method == "a2ats":
        return bucketed_scores(q, q_pos, keys_vq, rotary, buckets), same
    if method == "wrope":
        return bucketed_scores(q, q_pos, keys_vq, rotary, DistanceBuckets.single()), same
    if method == "quest":
        cq, sq = rotary.cos_sin(q_pos)
        ck, sk = rotary.cos_sin(torch.arange(n))
        return quest_token_scores(apply_rope(q.float(), cq, sq), apply_rope(keys.float(), ck, sk), num_kv_heads), same
    if method == "streaming":
        recency = torch.arange(n, dtype=torch.float32).expand(q.shape[0], q.shape[1], n)
        return recency.contiguous(), lambda p: SelectionPolicy(p.n_sink, p.window, p.budget, "max")
    if method == "oracle":
        return None, same
    raise ValueError(f"unknown recall method {method!r}")


def recall_curve(
    captured: Sequence[Captured],
    codebooks: list[torch.Tensor],
    whitening: list[torch.Tensor],
    rotary: Rotary,
    buckets: DistanceBuckets,
    budgets: Sequence[float | int],
    *,
    n_sink: int = RuntimeSettings.n_sink,
    window: int = RuntimeSettings.window,
    aggregation: str = RuntimeSettings.aggregation,
    methods: Sequence[str] = RECALL_METHODS,
    queries_per_sequence: int = 16,
    rerank: float = RuntimeSettings.rerank,
    rerank_aggregation: str = RuntimeSettings.rerank_aggregation,
    scale: float | None = None,
    progress: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Mass and top-K recall per method, budget and layer (means over query heads, queries and sequences).

    ``scale`` is the model's softmax scale (its attention modules' ``scaling``; None: ``head_dim**-0.5``): it
    weighs the attention mass and the re-ranking's group softmax, as in the runtime.

    Returns ``{"methods": [...], "budgets": [...], "per_layer": {method: {budget: {"mass": [L], "topk": [L]}}},
    "overall": {method: {budget: {"mass": x, "topk": y}}}}`` (budget keys as strings).
    """
    n_layers = len(codebooks)
    sums: dict[tuple[str, str, str], list[float]] = {}
    counts = 0
    for seq in captured:
        counts += 1
        for layer in range(n_layers):
            q_all, keys = seq.queries[layer].float(), seq.keys[layer].float()
            hkv, n, d = keys.shape
            q_pos = query_positions(n, queries_per_sequence, window)
            q = q_all[:, q_pos]
            true = exact_logits(q, q_pos, keys, rotary)
            softmax_scale = scale if scale is not None else d**-0.5
            keys_vq = None
            if {"a2ats", "norerank", "wrope"} & set(methods):
                codes = encode(keys.unsqueeze(0), prepare_codebook(codebooks[layer], whitening[layer]))[0].long()
                keys_vq = codebooks[layer].float().gather(1, codes.unsqueeze(-1).expand(hkv, n, d))
            for method in methods:
                base = "a2ats" if method == "norerank" else method
                scores, adapt = method_scores(base, q, q_pos, keys, keys_vq, rotary, buckets, hkv)
                for budget in budgets:
                    policy = adapt(SelectionPolicy(n_sink, window, budget, aggregation))  # type: ignore[arg-type]
                    approx = scores
                    if method == "a2ats" and rerank > 0 and scores is not None:
                        approx = reranked_scores(
                            true, scores, q_pos, policy, hkv, rerank, rerank_aggregation, softmax_scale
                        )
                    mass = mass_recall(true, approx, q_pos, policy, softmax_scale, hkv).mean().item()
                    top = topk_recall(true, approx, q_pos, policy, hkv).mean().item()
                    for metric, value in (("mass", mass), ("topk", top)):
                        sums.setdefault((method, str(budget), metric), [0.0] * n_layers)[layer] += value
            if progress is not None:
                progress()
    per_layer: dict[str, dict[str, dict[str, list[float]]]] = {}
    overall: dict[str, dict[str, dict[str, float]]] = {}
    for (method, budget, metric), values in sums.items():
        layer_means = [v / max(counts, 1) for v in values]
        per_layer.setdefault(method, {}).setdefault(budget, {})[metric] = layer_means
        overall.setdefault(method, {}).setdefault(budget, {})[metric] = sum(layer_means) / n_layers
    return {"methods": list(methods), "budgets": [str(b) for b in budgets], "per_layer": per_layer, "overall": overall}
