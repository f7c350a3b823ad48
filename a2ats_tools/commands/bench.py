"""``a2ats bench``: decode speed and memory of a converted checkpoint against dense attention."""

from __future__ import annotations

import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.markup import escape
from rich.table import Table

from . import options

if TYPE_CHECKING:
    from ..reporting import Reporter

SCHEMA_VERSION = 2
TEXT = "builtin:pydoc"  # the prompts' text: Python's documentation topics, shuffled with --seed
LEGEND = {
    "cache": "real: a real dense prefill of the context; synthetic(from N): a real N-token prefill tiled to it",
    "floor": "the dense model decoding from a --floor-token context in the same alternation (null: --floor 0)",
    "step_latency_s": "median step of each timed block: min/median/max over the blocks",
    "speedup_vs_dense": "dense block step / this contender's, per block pair: min/median/max",
    "vs_floor": "this step / the floor's, per block pair: min/median/max",
    "generate": "the same figures timed from outside through model.generate (--generate)",
    "prefill_s": "the shared dense cache's build time plus this contender's cache fill (cache_fill_s)",
    "cache_fill_share": "cache_fill_s / prefill_s on real prefills (keys encoded once); null otherwise",
    "kv_device_bytes": "K/V plus selector metadata on the compute device, after the fill",
    "kv_read_bytes_per_step": "A²ATS: bytes of K/V rows one timed decode step read from the store (candidates' keys, "
                              "kept rows' values; with offload=cpu what moves from host to device); null for dense",
    "kv_write_bytes_per_step": "A²ATS: bytes one decode step appended to the store (its new keys and values)",
    "rss": "peak resident set size: over the point where the OS lets the peak be reset (scope point), else "
           "over the process so far (scope process: monotone)",
}


@dataclass(frozen=True)
class Plan:
    """The parsed grid and timing options."""

    contexts: list[int]
    batches: list[int]
    kinds: list[Any]  # bench.grid.CacheKind
    timing: Any  # bench.decode.Timing
    floor: int
    memory_limit: float | None
    seed: int


def bench(
    checkpoint: options.Checkpoint,
    out: Path = typer.Option(Path("runs/bench"), "--out", "-o",
                             help="Directory for bench.json, throughput.png and latency.png."),
    contexts: str = typer.Option("1024,2048,4096,8192", "--contexts", help="Context lengths (tokens; 4k, 128k ...)."),
    batches: str = typer.Option("1,4,8", "--batches", help="Batch sizes."),
    cache: str = typer.Option(
        "real", "--cache", help="Where each point's dense cache comes from, a comma list: real (a real prefill), "
        "real:MAX (real prefills up to MAX tokens), synthetic:N (contexts above N: a real N-token prefill tiled to "
        "the context, keys re-rotated). A context runs with every kind that covers it.",
    ),
    floor: int = typer.Option(512, "--floor", help="Context of the floor, the dense step timed alongside (0 = off)."),
    steps: int = typer.Option(16, "--steps", help="Timed decode steps per block."),
    repeats: int = typer.Option(3, "--repeats", help="Alternating blocks per contender (min/median/max over them)."),
    generate: bool = typer.Option(False, "--generate", help="Also time --repeats rounds of --steps steps per "
                                  "contender from outside, through model.generate."),
    profile: bool = typer.Option(False, "--profile",
                                 help="Profile --steps more steps per contender: where a step goes."),
    memory_limit: float = typer.Option(None, "--memory-limit", help="Skip points whose caches together would pass "
                                       "this many GiB (dense K/V bytes × contenders)."),
    also: list[str] = typer.Option(
        None, "--also", help="Another A²ATS contender with runtime overrides on top of the runtime options, e.g. "
        "'offload=cpu' or 'score_dtype=float32' (repeatable).",
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of the prompt text's order (documentation topics, shuffled)."),
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
    """Decode step latency, throughput (tokens/s) and memory of retrieval attention vs dense attention.

    The dense baseline is the same model with plain SDPA and a DynamicCache; the runtime options set the A²ATS
    contender, and each --also adds one more on top of them. Each grid point builds one dense cache from real
    text (a chunked prefill, timed, or with --cache synthetic:N a real N-token prefill tiled to the context),
    fills the A²ATS caches from it (timed: each key encoded once), then alternates blocks of timed decode steps
    between the contenders and the floor (dense at a --floor-token context) in this process; ratios are per
    block pair, reported as min/median/max. Contexts past the model's positions are timed with a note. Writes
    bench.json, throughput.png and latency.png to --out. Kernel micro-benchmarks run on GPU only.

    Examples:

      a2ats bench runs/ckpt --out runs/bench

      a2ats bench runs/ckpt --contexts 8k --batches 4 --steps 8 --repeats 3 --generate -o runs/bench-8k

      a2ats bench runs/ckpt --contexts 8k --batches 1 --cache real,synthetic:4k -o runs/bench-synthetic-check

      a2ats bench runs/ckpt --contexts 1k,4k,16k,128k --batches 1 --cache real:4k,synthetic:4k -o runs/bench-long

      a2ats bench runs/ckpt --contexts 8k --batches 4 --also rerank=0 --also score_dtype=float32 -o runs/bench-knobs
    """
    params = dict(locals())  # the options as given, before any other local exists
    from ..evaluation.harness import ModelUnderTest
    from ..io import check_output_dir
    from ..reporting import ConsoleReporter

    plan = _plan(params)
    check_output_dir(out, overwrite, "bench output directory")  # fail fast; written once the timings are in
    reporter = ConsoleReporter(quiet)
    options.check_device_and_dtype(device, dtype)
    mut = ModelUnderTest(checkpoint, device=device, dtype=dtype, **options.runtime_overrides(params))
    contenders = _contenders(mut, also or [], plan)
    grid, notes = _grid(mut, plan, contenders)
    points = _run_points(mut, contenders, grid, plan, reporter)
    notes += _hardware_notes(mut, dtype)
    microbench = _kernel_microbench(notes) if mut.device.type == "cuda" else None
    result = _record(params, plan, mut, contenders, points, microbench, notes)
    _write(out, overwrite, result, mut)
    tables = ConsoleReporter(quiet, stderr=False)  # the tables go to stdout
    tables.table(bench_table(points))
    if generate:
        tables.table(generate_table(points))
    if profile:
        tables.table(profile_table(points))
    for n in notes:
        reporter.note(n)
    reporter.info(f"wrote {out / 'bench.json'}")


def _plan(params: dict[str, Any]) -> Plan:
    """Parse and check the grid and timing options (before the model loads)."""
    from ..bench.decode import Timing
    from ..bench.grid import parse_cache_kinds
    from ..errors import A2atsError
    from ..evaluation.options import parse_int_list

    if params["steps"] < 1 or params["repeats"] < 1:
        raise A2atsError("--steps and --repeats must be positive")
    if params["floor"] < 0:
        raise A2atsError("--floor must be 0 (off) or a context length")
    if params["memory_limit"] is not None and params["memory_limit"] <= 0:
        raise A2atsError("--memory-limit must be a positive number of GiB")
    timing = Timing(params["steps"], params["repeats"], generate=params["generate"], profile=params["profile"])
    return Plan(parse_int_list(params["contexts"], "--contexts"), parse_int_list(params["batches"], "--batches"),
                parse_cache_kinds(params["cache"]), timing, params["floor"], params["memory_limit"], params["seed"])


def _contenders(mut: Any, also: list[str], plan: Plan) -> list[Any]:
    """Dense, the A²ATS contender of the runtime options, and one per --also (checked before any timing)."""
    from ..bench.decode import Contender
    from ..evaluation.harness import Variant
    from ..runtime.settings import parse_overrides

    def variant(name: str, extra: dict | None) -> Contender:
        holder: dict = {}

        def prepare() -> None:
            holder["make"] = mut.use(Variant(name, extra) if extra is not None else Variant("dense"))

        def fill(prefix: Any) -> Any:  # the final length is known: the cache reserves it
            return mut.runtime.cache_from(prefix, reserve=prefix.get_seq_length() + plan.timing.decode_tokens())

        return Contender(name, prepare, lambda: holder["make"](), None if extra is None else fill)

    contenders = [variant("dense", None), variant(mut.base_settings.selector, {})]
    for spec in also:
        extra = parse_overrides(spec)
        mut.base_settings.with_overrides(**extra)  # a bad key or value fails here, before any timing
        contenders.append(variant(f"a2ats[{spec}]", extra))
    return contenders


def _grid(mut: Any, plan: Plan, contenders: list[Any]) -> tuple[list[Any], list[str]]:
    import torch

    from ..bench.grid import plan_points

    element = torch.empty(0, dtype=next(mut.model.parameters()).dtype).element_size()
    return plan_points(mut.model, plan.contexts, plan.batches, plan.kinds, decode_tokens=plan.timing.decode_tokens(),
                       caches=len(contenders), element_size=element, memory_limit=plan.memory_limit)


def _run_points(mut: Any, contenders: list[Any], grid: list[Any], plan: Plan, reporter: Reporter) -> list[dict]:
    """Every grid point in turn, with a progress bar; each point's peak RSS beside its timings."""
    from ..bench.decode import bench_point
    from ..bench.memory import peak_rss_bytes, reset_device_peak, reset_peak_rss
    from ..bench.prompts import text_tokens

    stream = text_tokens(mut.tokenizer, plan.seed)
    points = []
    with reporter.progress("bench", total=len(grid) * len(contenders) * (plan.timing.repeats + 1)) as bar:
        for point in grid:
            bar.describe(f"context {point.context}, batch {point.batch}, {point.cache} cache")
            scope = "point" if reset_peak_rss() else "process"
            reset_device_peak(mut.device)
            contenders[0].prepare()  # prefills are dense
            start, floor = _start(mut, stream, point, plan)
            res = bench_point(mut.model, contenders, start, plan.timing, floor=floor,
                              pad_token_id=mut.tokenizer.pad_token_id, tick=bar.advance)
            del start, floor
            res["rss"] = {"peak_bytes": peak_rss_bytes(), "scope": scope}
            points.append(res)
    return points


def _start(mut: Any, stream: list[int], point: Any, plan: Plan) -> tuple[Any, Any]:
    """The point's dense cache (real or synthetic) and the floor's (a real prefill of --floor tokens)."""
    from ..bench.grid import SYNTHETIC
    from ..bench.prefill import real_prefill
    from ..bench.prompts import prompt_ids
    from ..bench.synthetic import synthetic_prefill

    def ids(length: int):
        return prompt_ids(stream, point.batch, length).to(mut.device)

    if point.cache.kind == SYNTHETIC:
        start = synthetic_prefill(mut.model, ids(point.cache.tokens), point.context)
    else:
        start = real_prefill(mut.model, ids(point.context))
    return start, real_prefill(mut.model, ids(plan.floor)) if plan.floor else None


def _hardware_notes(mut: Any, dtype: str) -> list[str]:
    from ..runtime.selectors.a2ats import fused_kernel_refusal

    if mut.device.type == "cuda":
        return []
    return [_cpu_decode_path(dtype, fused_kernel_refusal(mut.runtime.rotary)),
            "kernel micro-benchmarks skipped: they run on GPU only"]


def _record(params: dict, plan: Plan, mut: Any, contenders: list, points: list, microbench: str | None,
            notes: list[str]) -> dict[str, Any]:
    """bench.json: self-describing (schema version, settings, legend) for renderers."""
    import torch

    from ..models import text_config
    from ..provenance import run_provenance

    settings = {"contexts": plan.contexts, "batches": plan.batches, "cache": [str(k) for k in plan.kinds],
                "floor": plan.floor, "steps": plan.timing.steps, "repeats": plan.timing.repeats,
                "warmup_steps": plan.timing.warmup, "generate": plan.timing.generate, "profile": plan.timing.profile,
                "memory_limit_gib": plan.memory_limit, "seed": plan.seed, "text": TEXT, "also": params["also"] or []}
    return {
        "schema": "a2ats.bench", "schema_version": SCHEMA_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "host": platform.node(),
        "checkpoint": str(params["checkpoint"]), "model": mut.runtime.config.model_name(), "device": str(mut.device), "dtype": params["dtype"],
        "torch_threads": torch.get_num_threads(), "runtime": mut.base_settings.to_record(),
        "max_position_embeddings": getattr(text_config(mut.model), "max_position_embeddings", None),
        "settings": settings, "contenders": [c.name for c in contenders], "legend": LEGEND,
        "points": points, "kernels": microbench, "notes": notes, "provenance": run_provenance(),
    }


def _write(out: Path, overwrite: bool, result: dict, mut: Any) -> None:
    from ..bench.plots import plot_latency, plot_throughput
    from ..io import atomic_directory, write_json

    # a previous --out stays whole until now
    with atomic_directory(out, overwrite, "bench output directory", writer="bench") as tmp:
        write_json(tmp / "bench.json", result)
        plot_throughput(result["points"], tmp / "throughput.png", title=f"decode throughput ({mut.device.type})")
        plot_latency(result["points"], tmp / "latency.png", title=f"decode step latency ({mut.device.type})")


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


def _ms(seconds: float) -> str:
    return f"{1e3 * seconds:.0f}" if seconds >= 0.1 else f"{1e3 * seconds:.1f}"


def _spread(s: dict[str, float] | None, ms: bool = False) -> str:
    """``median (min–max)``: milliseconds, or ratios."""
    if not s:
        return "-"
    fmt = _ms if ms else (lambda x: f"{x:.2f}")
    return f"{fmt(s['median'])} ({fmt(s['min'])}–{fmt(s['max'])})"


def _rows(p: dict) -> list[tuple[str, dict]]:
    rows = list(p["contenders"].items())
    if p.get("floor"):
        rows.append((f"floor ({p['floor']['context']})", p["floor"]))
    return rows


def _table(title: str, cols: list[str]) -> Table:
    table = Table(title=title)
    for col in cols:
        table.add_column(col, justify="left" if col in ("contender", "cache") else "right", overflow="fold",
                         no_wrap=col not in ("contender", "cache"))
    return table


def bench_table(points: list[dict]) -> Table:
    """One row per (point, contender), so any number of ``--also`` contenders stays readable (schema 1 points,
    without cache kinds, floor or step latency, read as real-cache points)."""
    table = _table("Decode step: median (min–max over blocks); × floor and × dense per block pair",
                   ["context", "batch", "cache", "contender", "ms/step", "× floor", "speed-up", "tok/s",
                    "prefill s (encode)", "KV MiB", "KV read MiB/step", "peak RSS GiB"])
    for p in points:
        rows = _rows(p)
        for i, (name, c) in enumerate(rows):
            share = c.get("cache_fill_share")
            prefill = f"{c['prefill_s']:.1f}" + (f" ({100 * share:.0f}%)" if share else "") if "prefill_s" in c else "-"
            table.add_row(
                *((str(p["context"]), str(p["batch"]), p.get("cache", "real")) if i == 0 else ("", "", "")), escape(name),
                _spread(c.get("step_latency_s"), ms=True), _spread(c.get("vs_floor")), _spread(c.get("speedup_vs_dense")),
                f"{c['tokens_per_s']['median']:.1f}" if "tokens_per_s" in c else "-", prefill,
                f"{c['kv_device_bytes'] / 2**20:.1f}" if "kv_device_bytes" in c else "-",
                f"{c['kv_read_bytes_per_step'] / 2**20:.2f}" if c.get("kv_read_bytes_per_step") is not None else "-",
                f"{p['rss']['peak_bytes'] / 2**30:.2f}" if i == 0 and "rss" in p else "",
                end_section=i == len(rows) - 1,
            )
    return table


def generate_table(points: list[dict]) -> Table:
    """The steps timed through ``model.generate`` beside the forward-only ones."""
    table = _table("Through model.generate: ms/step median (min–max over rounds), × floor and × dense per round",
                   ["context", "batch", "cache", "contender", "generate ms/step", "× floor", "speed-up",
                    "forward ms/step"])
    for p in points:
        rows = [(name, c) for name, c in _rows(p) if "generate" in c]
        for i, (name, c) in enumerate(rows):
            g = c["generate"]
            table.add_row(*((str(p["context"]), str(p["batch"]), p.get("cache", "real")) if i == 0 else ("", "", "")),
                          escape(name), _spread(g["step_latency_s"], ms=True), _spread(g.get("vs_floor")),
                          _spread(g.get("speedup_vs_dense")), _ms(c["step_latency_s"]["median"]),
                          end_section=i == len(rows) - 1)
    return table


def _profile_columns() -> dict[str, str]:
    """bench.profile's groups -> short column titles."""
    from ..bench import profile as bp

    return {bp.G_LINEAR: "linear", bp.G_KERNEL: "kernel", bp.G_GATHER: "attn gathers", bp.G_ATTN_OPS: "attn ops",
            bp.G_ATTN_PY: "attn py", bp.G_BOOK: "cache/mask", bp.G_OTHER: "other ops", bp.G_PYTHON: "python"}


def profile_table(points: list[dict]) -> Table:
    """Where each contender's profiled step went, ms per step per group."""
    columns = _profile_columns()
    table = _table("Where a decode step goes (torch.profiler, ms/step; profiling adds overhead)",
                   ["context", "batch", "cache", "contender", *columns.values(), "wall"])
    for p in points:
        rows = [(name, c["profile"]) for name, c in p["contenders"].items() if "profile" in c]
        for i, (name, prof) in enumerate(rows):
            table.add_row(*((str(p["context"]), str(p["batch"]), p.get("cache", "real")) if i == 0 else ("", "", "")),
                          escape(name), *(_ms(prof["groups"][g]) for g in columns), _ms(prof["wall_s_per_step"]),
                          end_section=i == len(rows) - 1)
    return table
