"""``a2ats convert``: a thin CLI wrapper around :func:`a2ats_tools.quantization.convert`."""

from __future__ import annotations

from pathlib import Path

import typer

from ..defaults import DEFAULT_CODES


def convert(
    calibration: Path = typer.Argument(..., help="Calibration directory written by a2ats calibrate."),
    out: Path = typer.Option(Path("runs/converted"), "--out", "-o", help="Checkpoint directory to write."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output directory."),
    model: str = typer.Option(None, "--model", "-m", help="Model to convert (default: the calibration's model)."),
    codes: int = typer.Option(DEFAULT_CODES, "--codes", help="Codes per (layer, KV head)."),
    plain: bool = typer.Option(False, "--plain", help="Plain VQ: Euclidean k-means, no query-aware whitening."),
    positions: str = typer.Option(
        "all", "--positions", help="Query moment to whiten with: 'all' stored relative positions averaged, or one (2048)."
    ),
    buckets: str = typer.Option("log", "--buckets", help="Scoring distances: 'log' buckets, or 'single' (WRoPE 2048)."),
    iters: int = typer.Option(20, "--iters", help="Most Lloyd iterations per head (two-level: per coarse and per fine problem)."),
    tol: float = typer.Option(1e-4, "--tol", help="Stop a head once its inertia changes by at most this (relative)."),
    algorithm: str = typer.Option(
        "auto", "--algorithm",
        help="k-means trainer: 'lloyd' (full Lloyd), 'two-level' (coarse-to-fine, fast on CPU) or 'auto' "
        "(lloyd on CUDA, two-level otherwise).",
    ),
    seed: int = typer.Option(0, "--seed", help="Seed: same seed and device give bit-identical codebooks."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda or auto."),
    light: bool = typer.Option(False, "--light", help="Reference the model's weights instead of copying them."),
    allow_shrink: bool = typer.Option(False, "--allow-shrink", help="Shrink --codes (with a warning) if keys are few."),
    compare_plain: bool = typer.Option(
        True, "--compare-plain/--no-compare-plain", help="Also train plain VQ codebooks for the report."
    ),
    settings: str = typer.Option(
        None, "--settings", help="Decode defaults the checkpoint records (budget, n_sink, window, aggregation, "
        "rerank), e.g. 'rerank=8,aggregation=max'; load-time options still override them."
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar or report table."),
) -> None:
    """Train query-aware VQ codebooks on a calibration and write a converted checkpoint.

    The checkpoint holds the model (weights, config.json with an a2ats quantization_config, tokenizer),
    a2ats_codebooks.safetensors, report.json and a2ats_config.json (written last). A recall table compares
    query-aware VQ, plain VQ, exact keys and the exact-attention oracle on the held-out sample.
    Under [bold]accelerate launch[/] the heads are split across processes. See docs/convert.md.

    Examples:

      a2ats convert runs/calib --out runs/smollm2-a2ats

      a2ats convert runs/calib-small --out runs/small --codes 1024 --iters 10 --overwrite

      a2ats convert runs/calib-gemma3 --out runs/gemma3-a2ats --settings rerank=8,aggregation=max

      a2ats convert runs/calib --out runs/plain --plain --buckets single --no-compare-plain

      accelerate launch --multi_gpu --num_processes 2 -m a2ats_tools.cli convert runs/calib --out runs/conv

      torchrun --nproc_per_node 2 -m a2ats_tools.cli convert runs/calib --out runs/conv   # same, CPU ranks
    """
    from ..quantization import convert as run_convert
    from ..reporting import ConsoleReporter

    run_convert(
        calibration, out, model=model, codes=codes, plain=plain, positions=positions, buckets=buckets, iters=iters,
        tol=tol, algorithm=algorithm, seed=seed, device=device, light=light, allow_shrink=allow_shrink,
        overwrite=overwrite, compare_plain=compare_plain, settings=settings, reporter=ConsoleReporter(quiet),
    )
