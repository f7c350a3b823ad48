"""``a2ats bench``: decode speed and memory of a converted checkpoint against dense attention."""

from __future__ import annotations

import platform
import time
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from . import options


def bench(
    checkpoint: options.Checkpoint,
    out: Path = typer.Option(Path("runs/bench"), "--out", "-o", help="Directory for bench.json and throughput.png."),
    contexts: str = typer.Option("1024,2048,4096,8192", "--contexts", help="Context lengths (tokens; GPU: up to 128k)."),
    batches: str = typer.Option("1,4,8", "--batches", help="Batch sizes."),
    steps: int = typer.Option(16, "--steps", help="Timed decode steps per block."),
    repeats: int = typer.Option(3, "--repeats", help="Alternating blocks per contender (min/median/max over them)."),
    also: list[str] = typer.Option(
        None, "--also", help="Another A²ATS contender with runtime overrides on top of the runtime options, e.g. "
        "'offload=cpu' or 'score_dtype=float32' (repeatable).",
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of the random prompt tokens."),
    device: options.Device = "cpu",
    dtype: options.Dtype = "float32",
    overwrite: options.Overwrite = False,
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar and no table."),
    budget: options.Budget = None,
    buckets: options.Buckets = None,
    selector: options.Selector = None,
    rerank: options.Rerank = None,
    rerank_aggregation: options.RerankAggregation = None,
    aggregation: options.Aggregation = None,
    prefill_chunk: options.PrefillChunk = None,
    offload: options.Offload = None,
    dense_layers: options.DenseLayers = None,
    score_dtype: options.ScoreDtype = None,
    kernels: options.Kernels = None,
) -> None:
    """Decode throughput (tokens/s), per-step latency and memory of retrieval attention vs dense attention.

    The dense baseline is the same model with plain SDPA and a DynamicCache; the runtime options set the A²ATS
    contender, and each --also adds one more on top of them. Each grid point runs one chunked
    dense prefill (timed; A²ATS prefill is dense too), fills the A²ATS cache from it (timed: each key encoded
    once), then alternates blocks of timed decode steps between the contenders in this process; ratios are per
    block pair, reported as min/median/max. Writes bench.json and
    throughput.png to --out. Kernel micro-benchmarks run on GPU only.

    Examples:

      a2ats bench runs/ckpt --out runs/bench

      a2ats bench runs/ckpt --contexts 8k --batches 4 --steps 8 --repeats 3 -o runs/bench-8k

      a2ats bench runs/ckpt --device cuda --contexts 8k,32k,128k --batches 1,8 --also offload=cpu -o runs/bench-gpu

      a2ats bench runs/ckpt --contexts 8k --batches 4 --also rerank=0 --also score_dtype=float32 -o runs/bench-knobs
    """
    params = dict(locals())  # the options as given, before any other local exists
    import torch

    from ..bench.decode import WARMUP_STEPS, Contender, bench_point
    from ..bench.plots import plot_throughput
    from ..errors import A2atsError
    from ..evaluation.harness import ModelUnderTest, Variant
    from ..evaluation.options import parse_int_list
    from ..io import atomic_directory, check_output_dir, write_json
    from ..runtime.selectors.a2ats import fused_kernel_refusal
    from ..runtime.settings import parse_overrides

    ctx_list = parse_int_list(contexts, "--contexts")
    batch_list = parse_int_list(batches, "--batches")
    if steps < 1 or repeats < 1:
        raise A2atsError("--steps and --repeats must be positive")
    check_output_dir(out, overwrite, "bench output directory")  # fail fast; written once the timings are in
    console = Console(stderr=True, quiet=quiet)
    options.check_device_and_dtype(device, dtype)
    mut = ModelUnderTest(checkpoint, device=device, dtype=dtype, **options.runtime_overrides(params))
    max_len = mut.runtime.config.geometry.max_position_embeddings
    notes = []
    too_long = [c for c in ctx_list if c + (repeats + 1) * steps + 4 > max_len]
    if too_long:
        notes.append(f"contexts {too_long} are beyond the model's {max_len} positions minus decode steps; trimmed")
    grid_ctx = sorted({min(c, max_len - (repeats + 1) * steps - 4) for c in ctx_list})

    def variant(name: str, extra: dict) -> Contender:
        holder: dict = {}

        def prepare() -> None:
            holder["make"] = mut.use(Variant(name, extra) if extra is not None else Variant("dense"))

        decode = WARMUP_STEPS + repeats * steps + 2  # warm-up + timed steps (+2 spare): the final length is known
        fill = None if extra is None else (lambda prefix: mut.runtime.cache_from(prefix, reserve=prefix.get_seq_length() + decode))
        return Contender(name, prepare, lambda: holder["make"](), fill)

    contenders = [variant("dense", None), variant(mut.base_settings.selector, {})]
    for spec in also or []:
        extra = parse_overrides(spec)
        mut.base_settings.with_overrides(**extra)  # a bad key or value fails here, before any timing
        contenders.append(variant(f"a2ats[{spec}]", extra))
    gen = torch.Generator().manual_seed(seed)
    vocab = mut.model.config.get_text_config().vocab_size
    points = []
    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=console, disable=quiet,
    ) as progress:
        bar = progress.add_task("bench", total=len(grid_ctx) * len(batch_list) * len(contenders) * (repeats + 1))
        for ctx in grid_ctx:
            for batch in batch_list:
                progress.update(bar, description=f"context {ctx}, batch {batch}")
                ids = torch.randint(100, vocab, (batch, ctx), generator=gen).to(mut.device)
                points.append(bench_point(mut.model, contenders, ids, steps=steps, repeats=repeats,
                                          tick=lambda: progress.advance(bar)))
    microbench = None
    if mut.device.type != "cuda":
        notes.append(_cpu_decode_path(dtype, fused_kernel_refusal(mut.runtime.rotary)))
        notes.append("kernel micro-benchmarks skipped: they run on GPU only")
    else:
        microbench = _kernel_microbench(notes)
    result = {
        "schema": "a2ats.bench", "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "host": platform.node(), "checkpoint": str(checkpoint), "device": str(mut.device), "dtype": dtype,
        "torch_threads": torch.get_num_threads(), "runtime": mut.base_settings.to_record(),
        "points": points, "kernels": microbench, "notes": notes,
    }
    with atomic_directory(out, overwrite, "bench output directory", writer="bench") as tmp:  # a previous --out stays whole until now
        write_json(tmp / "bench.json", result)
        plot_throughput(points, tmp / "throughput.png", title=f"decode throughput ({mut.device.type})")
    if not quiet:
        Console().print(bench_table(points))
        for n in notes:
            console.print(f"[yellow]note:[/] {escape(n)}")
        console.print(f"wrote {out / 'bench.json'}", highlight=False)


def _cpu_decode_path(dtype: str, refusal: str | None = None) -> str:
    """Which code the A²ATS contenders' CPU decode steps ran (the default ``kernels=auto``), for the record
    (``refusal``: why the model's rotation keeps the fused kernel out, if it does)."""
    from ..kernels import cpu_decode

    if not cpu_decode.available():
        return f"A²ATS decode steps ran the torch path: {cpu_decode.unavailable_reason()}"
    if dtype != "float32":
        return f"A²ATS decode steps ran the torch path: the fused CPU kernel serves float32 K/V, not {dtype}"
    if refusal is not None:
        return f"A²ATS decode steps ran the torch path: {refusal}"
    return "A²ATS decode steps ran the fused CPU kernel (kernels=auto); --also kernels=torch times the torch path"


def _kernel_microbench(notes: list[str]) -> str | None:
    """Output of the kernel engineer's ``benchmarks/kernels.py`` (GPU), when this is a source checkout."""
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[2] / "benchmarks" / "kernels.py"
    if not script.is_file():
        notes.append("kernel micro-benchmarks skipped: benchmarks/kernels.py is not present (installed package)")
        return None
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True)
    if run.returncode != 0:
        notes.append(f"benchmarks/kernels.py failed (exit {run.returncode}); see bench.json 'kernels'")
    return run.stdout + run.stderr


def bench_table(points: list[dict]) -> Table:
    """One row per (context, batch, contender), so any number of ``--also`` contenders stays readable."""
    table = Table(title="Decode throughput and speed-up vs dense: median (min–max over repeats)")
    for col in ("context", "batch", "contender", "tok/s", "speed-up", "prefill s", "KV MiB"):
        table.add_column(col, justify="left" if col == "contender" else "right", overflow="fold",
                         no_wrap=col != "contender")
    for p in points:
        for i, (name, c) in enumerate(p["contenders"].items()):
            s = c.get("speedup_vs_dense")
            speedup = f"{s['median']:.2f}× ({s['min']:.2f}–{s['max']:.2f})" if s else "-"
            where = (str(p["context"]), str(p["batch"])) if i == 0 else ("", "")
            table.add_row(*where, escape(name), f"{c['tokens_per_s']['median']:.1f}", speedup,
                          f"{c['prefill_s']:.1f}", f"{c['kv_device_bytes'] / 2**20:.1f}",
                          end_section=i == len(p["contenders"]) - 1)
    return table
