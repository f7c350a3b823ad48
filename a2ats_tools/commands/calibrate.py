"""``a2ats calibrate``: a thin CLI wrapper around :func:`a2ats_tools.calibration.calibrate`."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer

from ..defaults import MIN_TOKENS

if TYPE_CHECKING:
    from ..calibration import CalibrationSet


def calibrate(
    out: Path = typer.Option(Path("runs/calib"), "--out", "-o", help="Calibration directory to write."),
    model: str = typer.Option(
        None, "--model", "-m", help="Hub id, local directory or .gguf file. Default: the embedded SmolLM2-135M."
    ),
    gguf_file: str = typer.Option(None, "--gguf-file", help="GGUF file inside --model's directory."),
    recipe: str = typer.Option(
        "default", "--recipe", "-r", help="Recipe name (in calib/: default, small), TOML path, or 'none'."
    ),
    tokens: int = typer.Option(None, "--tokens", help="Scale the recipe's training tokens to this total."),
    source: list[str] = typer.Option(
        None, "--source", help="Add a local .txt/.jsonl/.parquet file or folder: PATH or PATH=TOKENS (repeatable)."
    ),
    positions: str = typer.Option(
        "2048,log",
        "--positions",
        help="Relative position(s) for the WRoPE query moments: 2048, a comma list, 'log' (log-spaced bucket "
        "centres up to the model's context), or a mix.",
    ),
    seed: int = typer.Option(0, "--seed", help="Seed for data order, UUIDs and sampled text."),
    max_length: int = typer.Option(None, "--max-length", help="Longest document piece (default: model context)."),
    chunk_size: int = typer.Option(None, "--chunk-size", help="Prefill chunk size (default: the recipe's; 8192 in the default recipe)."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda or auto."),
    dtype: str = typer.Option("float32", "--dtype", help="Model dtype: float32, bfloat16 or float16."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output directory."),
    allow_few_tokens: bool = typer.Option(
        False, "--allow-few-tokens",
        help=f"Write a calibration of fewer than {MIN_TOKENS:,} training tokens (with a warning) instead of failing; "
        "convert then needs a smaller --codes or --allow-shrink.",
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Capture pre-RoPE keys and WRoPE query statistics of a model over calibration text.

    Writes a calibration directory (manifest.json + one layer_XXX.safetensors per layer) for
    [bold]a2ats convert[/]. See docs/calibration.md.

    Examples:

      a2ats calibrate --out runs/calib                      # embedded SmolLM2, default recipe (~80K tokens)

      a2ats calibrate --recipe small --out runs/calib-small --overwrite

      a2ats calibrate --model ./my-llama --recipe none --source data/ --tokens 32000 --out runs/mine

      a2ats calibrate --positions 2048 --source notes.jsonl=8000 --out runs/calib2
    """
    from ..calibration import calibrate as run_calibration
    from ..reporting import ConsoleReporter

    reporter = ConsoleReporter(quiet)
    result = run_calibration(
        out, model=model, gguf_file=gguf_file, recipe=recipe, tokens=tokens, sources=list(source) if source else None,
        positions=positions, seed=seed, max_length=max_length, chunk_size=chunk_size, device=device, dtype=dtype,
        overwrite=overwrite, allow_few_tokens=allow_few_tokens, reporter=reporter,
    )
    reporter.info(_summary(result))


def _summary(result: CalibrationSet) -> str:
    """One line on a written calibration: tokens, layers, relative positions and the held-out shape."""
    m = result.manifest
    return (f"wrote {result.path}: {m['tokens']['total']:,} tokens, {result.num_layers} layers, "
            f"{len(m['relative_positions'])} relative positions, held-out {m['heldout']['sequences']}×"
            f"{m['heldout']['length']}")
