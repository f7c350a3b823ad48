"""The conversion report: attention-mass recall on the held-out calibration sample, per layer.

Rows: query-aware VQ, plain VQ (optional), exact pre-RoPE keys under the same WRoPE/bucket scoring (the
best any codebook can do) and the exact-attention oracle (top-K by the true logits). Recall is the share of
the exact softmax mass carried by the selected tokens (sinks + window + top-K per KV head, shared by the group).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from rich.table import Table

from ..calibration.format import HELDOUT_KEYS, HELDOUT_POSITIONS, HELDOUT_QUERIES, CalibrationSet
from ..reporting import Reporter
from ..rope import DistanceBuckets, Rotary
from ..runtime.settings import RuntimeSettings
from ..scoring import bucketed_scores, exact_logits, mass_recall
from .kmeans import assign

METHODS = ("query_aware_vq", "plain_vq", "exact_keys", "oracle")
LABELS = {"query_aware_vq": "query-aware VQ", "plain_vq": "plain VQ", "exact_keys": "exact keys", "oracle": "oracle"}


def quantize(keys: torch.Tensor, codebook: torch.Tensor, lower: torch.Tensor) -> torch.Tensor:
    """Replace each key ``[Hkv, N, d]`` by its nearest code under the whitened metric ``||(k − c) L||²``."""
    lw = lower.float()
    labels, _ = assign(keys.float() @ lw, codebook.float() @ lw)
    return codebook.float().gather(1, labels.unsqueeze(-1).expand(*labels.shape, codebook.shape[-1]))


@torch.no_grad()
def layer_recall(
    calib: CalibrationSet,
    layer: int,
    codebooks: dict[str, tuple[torch.Tensor, torch.Tensor]],
    rotary: Rotary,
    buckets: DistanceBuckets,
    policy: RuntimeSettings,
    scale: float | None = None,
) -> dict[str, float]:
    """Mean recall of one layer for each method; ``codebooks`` maps a method to ``(codebook, whitening)``;
    ``scale``: the model's softmax scale (None: ``head_dim**-0.5``)."""
    keys = calib.tensor(layer, HELDOUT_KEYS).float()  # [S, Hkv, L, d]
    queries = calib.tensor(layer, HELDOUT_QUERIES).float()  # [S, Hq, M, d]
    positions = calib.tensor(layer, HELDOUT_POSITIONS).long()  # [S, M]
    hkv, d = keys.shape[1], keys.shape[-1]
    scale = scale if scale is not None else d**-0.5
    totals: dict[str, list[torch.Tensor]] = {}
    for s in range(keys.shape[0]):
        true = exact_logits(queries[s], positions[s], keys[s], rotary)
        scored: dict[str, torch.Tensor | None] = {"oracle": None}
        scored["exact_keys"] = bucketed_scores(queries[s], positions[s], keys[s], rotary, buckets)
        for method, (codebook, lower) in codebooks.items():
            scored[method] = bucketed_scores(queries[s], positions[s], quantize(keys[s], codebook, lower), rotary, buckets)
        for method, approx in scored.items():
            totals.setdefault(method, []).append(mass_recall(true, approx, positions[s], policy, scale, hkv).flatten())
    return {m: float(torch.cat(v).mean()) for m, v in totals.items()}


def build_report(
    calib: CalibrationSet,
    codebooks: dict[int, torch.Tensor],
    factors: dict[int, torch.Tensor],
    plain: dict[int, torch.Tensor] | None,
    rotary: Rotary,
    buckets: DistanceBuckets,
    policy: RuntimeSettings,
    scale: float | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Per-layer (retrieved layers only) and mean recall for every method, as a JSON-ready dict; ``progress``
    is called with each layer once it is done."""
    rows = []
    for layer in calib.retrieval_layers:
        books = {"query_aware_vq": (codebooks[layer], factors[layer])}
        if plain is not None:
            eye = torch.eye(codebooks[layer].shape[-1]).expand_as(factors[layer])
            books["plain_vq"] = (plain[layer], eye)
        rows.append({"layer": layer, **layer_recall(calib, layer, books, rotary, buckets, policy, scale)})
        if progress is not None:
            progress(layer)
    methods = [m for m in METHODS if m in rows[0]]
    mean = {m: sum(r[m] for r in rows) / len(rows) for m in methods}
    return {
        "metric": "attention-mass recall on the held-out calibration sample",
        "policy": {"n_sink": policy.n_sink, "window": policy.window, "budget": policy.budget, "aggregation": policy.aggregation},
        "buckets": buckets.to_config(),
        "methods": methods,
        "layers": rows,
        "mean": mean,
    }


def report_table(report: dict[str, Any]) -> Table:
    """The report as a rich table, one row per layer plus the mean."""
    methods = report["methods"]
    table = Table(title=f"attention-mass recall at budget {report['policy']['budget']} (held-out sample)")
    table.add_column("layer", justify="right")
    for m in methods:
        table.add_column(LABELS[m], justify="right")
    for row in report["layers"]:
        table.add_row(str(row["layer"]), *(f"{row[m]:.4f}" for m in methods))
    table.add_row("mean", *(f"[bold]{report['mean'][m]:.4f}[/]" for m in methods), end_section=True)
    return table


def show_report(report: dict[str, Any], reporter: Reporter) -> None:
    """The report's table and, beside plain VQ, whether query-aware whitening helped."""
    reporter.table(report_table(report))
    methods = report["methods"]
    if "plain_vq" in methods:
        gain = report["mean"]["query_aware_vq"] - report["mean"]["plain_vq"]
        verdict = "helps" if gain > 0 else "does not help"
        reporter.info(f"query-aware VQ {verdict} on this model: {gain:+.4f} mean recall vs plain VQ")
