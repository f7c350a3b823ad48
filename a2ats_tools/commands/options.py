"""Options shared by the commands, each defined once with one type and one help text (``hf``-CLI style).

The runtime options are :class:`~a2ats_tools.runtime.settings.RuntimeSettings` fields; left out (None) they keep
the checkpoint's value. ``generate``, ``eval`` and ``bench`` take the same set (``eval`` has ``--budgets`` and
``--baseline-budget`` for its budget), and pass what was given to the runtime through :func:`runtime_overrides`.
This module imports typer only, so ``--help`` stays fast.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any

import typer

RUNTIME = "Runtime settings (default: the checkpoint's)"

Checkpoint = Annotated[str, typer.Argument(help="Converted checkpoint directory (from a2ats convert).")]
Device = Annotated[str, typer.Option("--device", help="cpu or cuda.")]
Dtype = Annotated[str, typer.Option("--dtype", help="float32, bfloat16 or float16.")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace an existing --out directory.")]

Budget = Annotated[str | None, typer.Option(
    "--budget", "-b", rich_help_panel=RUNTIME,
    help="Top-K per KV head: fraction in (0, 1] (0.03), percent in (0%, 100%] (3%) or tokens >= 1 (256).",
)]
Buckets = Annotated[str | None, typer.Option(
    "--buckets", rich_help_panel=RUNTIME,
    help="single, single:DIST, log (ratio 2, as convert writes) or log:RATIO.",
)]
Selector = Annotated[str | None, typer.Option(
    "--selector", rich_help_panel=RUNTIME,
    help="a2ats (default), streaming, exact (oracle top-K), quest (page bounds), dense, or a registered selector.",
)]
Rerank = Annotated[float | None, typer.Option(
    "--rerank", rich_help_panel=RUNTIME, help="Exact re-ranking of RERANK×K over-fetched candidates (default 3; 0 = off).",
)]
RerankAggregation = Annotated[str | None, typer.Option(
    "--rerank-aggregation", rich_help_panel=RUNTIME,
    help="How a GQA group's exact logits rank candidates: softmax (default: attention mass), sum or max.",
)]
Aggregation = Annotated[str | None, typer.Option(
    "--aggregation", rich_help_panel=RUNTIME,
    help="How a GQA group shares approximate scores: sum (default, fastest), max or softmax (best quality, slower).",
)]
PrefillChunk = Annotated[int | None, typer.Option(
    "--prefill-chunk", rich_help_panel=RUNTIME, help="Prefill in chunks of this many tokens.",
)]
Offload = Annotated[str | None, typer.Option(
    "--offload", rich_help_panel=RUNTIME, help="cpu: keep the full K/V in host memory (only selected rows move); none.",
)]
DenseLayers = Annotated[str | None, typer.Option(
    "--dense-layers", rich_help_panel=RUNTIME, help="Layers that decode densely, e.g. '0,1' ('none' = off).",
)]
ScoreDtype = Annotated[str | None, typer.Option(
    "--score-dtype", rich_help_panel=RUNTIME,
    help="Score-table precision: auto (float32 on CPU, bf16 on GPU), float32 or bfloat16.",
)]
Kernels = Annotated[str | None, typer.Option(
    "--kernels", rich_help_panel=RUNTIME,
    help="auto (on CPU the fused C++ decode kernel, built on first use where a compiler is found; Triton kernels "
    "on CUDA; torch paths otherwise), torch, cpu or triton.",
)]


RUNTIME_OPTIONS = (  # each is a RuntimeSettings field of the same name, and a parameter of the commands taking it
    "budget", "buckets", "selector", "rerank", "rerank_aggregation", "aggregation", "prefill_chunk", "offload",
    "dense_layers", "score_dtype", "kernels",
)


def runtime_overrides(params: Mapping[str, Any]) -> dict[str, Any]:
    """The runtime options among a command's ``params`` that were given (not None), keyed by their
    :class:`RuntimeSettings` field."""
    return {name: params[name] for name in RUNTIME_OPTIONS if params.get(name) is not None}


def check_device_and_dtype(device: str, dtype: str) -> None:
    """One-line errors for a dtype this tool does not run or a CUDA device that is not there."""
    import torch

    from ..errors import A2atsError

    if dtype not in ("float32", "bfloat16", "float16"):
        raise A2atsError(f"unknown --dtype {dtype!r}; use float32, bfloat16 or float16")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise A2atsError("--device cuda requested but no CUDA device is available")
