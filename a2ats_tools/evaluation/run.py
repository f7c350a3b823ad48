"""The three eval stages on a :class:`~a2ats_tools.evaluation.harness.ModelUnderTest`, each returning the
JSON-ready section of ``results.json``."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from ..models import attention_scale
from ..rope import DistanceBuckets
from .harness import ModelUnderTest, Variant
from .haystack import Haystack
from .perplexity import decode_nll, perplexity
from .recall_curve import RECALL_METHODS, capture_sequence, heldout_ids, recall_curve
from .tasks import make_sample

Tick = Callable[[], None]


def run_recall(
    mut: ModelUnderTest, budgets: Sequence[float | int], *, length: int, sequences: int, queries: int, seed: int,
    heldout: Path | None, tick: Tick | None = None,
) -> dict[str, Any]:
    """Held-out recall curve of every method (scored with the checkpoint's codebooks)."""
    mut.use(Variant("dense"))
    settings = mut.base_settings
    captured = []
    for s in range(sequences):
        ids = heldout_ids(mut.tokenizer, length * (s + 1), seed + 1, heldout)[length * s :]
        captured.append(capture_sequence(mut.model, ids))
    rt = mut.runtime
    buckets: DistanceBuckets = settings.buckets
    result = recall_curve(
        captured, rt.codebooks, rt.whitening, rt.rotary, settings, budgets, methods=RECALL_METHODS,
        queries_per_sequence=queries, scale=attention_scale(mut.model), progress=tick,
    )
    result.update({"length": length, "sequences": sequences, "queries_per_sequence": queries,
                   "buckets": buckets.to_config(), "rerank": settings.rerank,
                   "rerank_aggregation": settings.rerank_aggregation,
                   "heldout": str(heldout) if heldout else "builtin:pydoc"})
    return result


def run_tasks(
    mut: ModelUnderTest, variants: Sequence[Variant], tasks: Sequence[str], lengths: Sequence[int], *, samples: int,
    seed: int, haystack: Haystack, tick: Tick | None = None, keep_outputs: bool = True,
) -> dict[str, Any]:
    """Every task × length × sample on every variant (same prompts); exact-match scores."""
    rows = []
    for task in tasks:
        for length in lengths:
            items = [make_sample(task, mut.tokenizer, haystack, length, i, seed) for i in range(samples)]
            values: dict[str, list[float]] = {v.name: [] for v in variants}
            outputs: dict[str, list[str]] = {v.name: [] for v in variants}
            for item in items:  # one dense prefill per prompt, shared by the variants
                texts = mut.generate(item.prompt, item.max_new_tokens, variants)
                for name, text in texts.items():
                    values[name].append(item.score(text))
                    outputs[name].append(text)
                if tick is not None:
                    for _ in variants:
                        tick()
            scores = {name: {"mean": sum(v) / len(v), "n": len(v), "values": v} for name, v in values.items()}
            row: dict[str, Any] = {"task": task, "length": length, "scores": scores,
                                   "answers": [item.answers for item in items]}
            if "dense" in outputs:  # greedy outputs equal to dense's, token for token: a finer signal than the score
                row["same_as_dense"] = {
                    name: sum(a == b for a, b in zip(texts, outputs["dense"], strict=True))
                    for name, texts in outputs.items() if name != "dense"
                }
            if keep_outputs:
                row["outputs"] = outputs
            rows.append(row)
    return {"configs": [v.name for v in variants], "rows": rows, "samples": samples}


def perplexity_texts(tokenizer: Any, length: int, texts: int, seed: int, path: Path | None) -> list[list[int]]:
    """``texts`` held-out token sequences of ``length``: built-in pydoc shuffled with ``seed + 2`` (the first
    text, as with one), ``seed + 102``, ...; or consecutive ``length``-token windows of a user file."""
    if path is not None:
        ids = heldout_ids(tokenizer, length * texts, seed + 2, path)
        return [ids[i * length : (i + 1) * length] for i in range(texts)]
    return [heldout_ids(tokenizer, length, seed + 2 + 100 * i, None) for i in range(texts)]


def run_perplexity(
    mut: ModelUnderTest, variants: Sequence[Variant], *, length: int, n_decode: int, seed: int, text: Path | None,
    texts: int = 1, tick: Tick | None = None,
) -> dict[str, Any]:
    """Decode-mode perplexity of the last ``n_decode`` tokens of ``texts`` held-out texts of ``length`` tokens per
    variant: pooled over every scored token (``perplexity``, ``mean_nll``) and per text (``per_text``)."""
    per_text: dict[str, list[list[float]]] = {v.name: [] for v in variants}
    for ids in perplexity_texts(mut.tokenizer, length, texts, seed, text):
        prefix = mut.prefill(torch.tensor([ids[: -n_decode - 1]]))  # shared dense prefill
        for variant in variants:
            cache = mut.cache_for(variant, prefix)
            per_text[variant.name].append(decode_nll(mut.model, ids, n_decode, prefilled=cache, progress=tick))
    configs = {}
    for name, runs in per_text.items():
        nll = [x for run in runs for x in run]
        configs[name] = {"perplexity": perplexity(nll), "mean_nll": sum(nll) / len(nll),
                         "per_text": [perplexity(run) for run in runs]}
    return {"length": length, "n_decode": n_decode, "texts": texts,
            "text": str(text) if text else "builtin:pydoc", "configs": configs}
