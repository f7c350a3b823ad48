"""``convert``: train query-aware VQ codebooks from a calibration directory and write a converted checkpoint.

Jobs are (layer, KV head) pairs. In one process they are trained in batches of heads; under
``accelerate launch`` they are split across processes, each rank writes its part atomically, and the main
process merges after ``wait_for_everyone()``. Each head's RNG depends only on (seed, layer, head), so the
result is the same however the jobs are split. The checkpoint is assembled in a partial folder of this run's
own beside ``out`` (config last), under a lock that fails a second convert of the same ``out`` at once, and
swapped into place (:func:`a2ats_tools.io.atomic_directory`), so an interrupted run never leaves something that
loads and never touches a previous ``out``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from safetensors import safe_open

from ..artifacts.checkpoint import A2atsConfig, write_codebooks, write_config
from ..artifacts.model_files import check_geometry, write_model_files
from ..calibration.format import KEYS, QUERY_COUNT, WROPE_QUERY_MOMENT, CalibrationSet, layer_file
from ..defaults import DEFAULT_CODES
from ..errors import A2atsError, DataError
from ..io import atomic_directory, check_output_dir, open_safetensors, write_json, write_safetensors
from ..models import ModelSource, attention_scale, load_model, load_tokenizer, resolve_source, rotary
from ..rope import DistanceBuckets
from ..runtime.settings import RuntimeSettings
from . import whitening
from .kmeans import SEEDINGS, head_generator, kmeans
from .report import build_report, print_report
from .two_level import default_coarse, two_level_kmeans

REPORT_FILE = "report.json"
HEAD_BYTES_PER_BATCH = 1 << 31  # whitened keys of one batch of heads stay under 2 GiB
ALGORITHMS = ("auto", "lloyd", "two-level")


@dataclass(frozen=True)
class Job:
    layer: int
    head: int

    @property
    def name(self) -> str:
        return f"{self.layer}.{self.head}"


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise A2atsError(f"--device {device} was asked for but no CUDA device is available")
    return torch.device(device)


def resolve_algorithm(algorithm: str, device: torch.device) -> str:
    """``auto``: full Lloyd on CUDA, two-level (coarse-to-fine) k-means elsewhere."""
    if algorithm not in ALGORITHMS:
        raise A2atsError(f"--algorithm must be one of {', '.join(ALGORITHMS)}, not {algorithm!r}")
    if algorithm == "auto":
        return "lloyd" if device.type == "cuda" else "two-level"
    return algorithm


def parse_positions(value: str | int | None) -> str | int:
    if value is None or str(value).lower() in ("all", "bucketed", "log"):
        return "all"
    try:
        return int(value)
    except ValueError:
        raise A2atsError(f"--positions must be 'all' or one stored relative position, not {value!r}") from None


def resolve_buckets(spec: str, max_positions: int) -> DistanceBuckets:
    if spec == "log":
        return DistanceBuckets.log_spaced(max_positions)
    if spec == "single":
        return DistanceBuckets.single()
    raise A2atsError(f"--buckets must be 'log' or 'single', not {spec!r}")


def keys_per_head(calib: CalibrationSet) -> int:
    with open_safetensors(calib.path / layer_file(calib.retrieval_layers[0])) as f:
        return int(f.get_slice(KEYS).get_shape()[1])


def choose_codes(codes: int, available: int, allow_shrink: bool, console: Console) -> int:
    """The codebook size to train: ``codes``, or with ``allow_shrink`` a smaller power of two that the keys support."""
    if codes < 1:
        raise A2atsError("--codes must be at least 1")
    if available >= codes:
        return codes
    if not allow_shrink:
        raise DataError(
            f"each KV head has only {available} calibration keys for {codes} codes; pass a smaller --codes, "
            "calibrate more tokens, or --allow-shrink"
        )
    shrunk = 2 ** int(math.log2(max(1, available // 4))) if available >= 4 else 1
    console.print(f"[yellow]warning:[/] only {available} keys per head: shrinking the codebook from {codes} to {shrunk} codes")
    return shrunk


def layer_factors(
    calib: CalibrationSet, plain: bool, positions: str | int
) -> tuple[dict[int, torch.Tensor], list[list[float]]]:
    """The whitening factor ``L [Hkv, d, d]`` (float64) of every calibrated layer (keyed by layer index) and the
    Cholesky jitter each head needed (one row per calibrated layer, in layer order)."""
    geo = calib.geometry
    factors: dict[int, torch.Tensor] = {}
    jitters: list[list[float]] = []
    for layer in calib.retrieval_layers:
        if plain:
            f = whitening.identity(geo.num_kv_heads, geo.head_dim)
        else:
            h = whitening.query_moment(
                calib.tensor(layer, WROPE_QUERY_MOMENT), calib.tensor(layer, QUERY_COUNT), calib.relative_positions, positions
            )
            f = whitening.cholesky(h)
        factors[layer] = f.lower
        jitters.append(f.jitter)
    return factors, jitters


def train_jobs(
    calib: CalibrationSet,
    jobs: Sequence[Job],
    factors: dict[int, torch.Tensor],
    *,
    codes: int,
    iters: int,
    tol: float,
    seed: int,
    salt: int,
    device: torch.device,
    seeding: str,
    heads_per_batch: int,
    algorithm: str = "lloyd",
    progress: Any = None,
    label: str = "",
) -> dict[str, tuple[torch.Tensor, float]]:
    """Train one codebook per job: ``{job.name: (codebook [C, d] float32 in key space, inertia)}``."""
    out: dict[str, tuple[torch.Tensor, float]] = {}
    cached: dict[int, torch.Tensor] = {}
    for start in range(0, len(jobs), heads_per_batch):
        batch = list(jobs[start : start + heads_per_batch])
        xs = []
        for job in batch:
            if job.layer not in cached:
                cached.clear()
                cached[job.layer] = calib.tensor(job.layer, KEYS)
            keys = cached[job.layer][job.head].to(device).double()
            xs.append((keys @ factors[job.layer][job.head].to(device)).float())
        x = torch.stack(xs)
        check_finite(x, batch)
        gens = [head_generator(seed, j.layer, j.head, salt) for j in batch]

        where = f"{label}layer {batch[0].layer}–{batch[-1].layer}"

        def show(step: int, inertia: torch.Tensor, where=where) -> None:
            if progress is not None:
                progress.describe(f"{where} · iter {step + 1}/{iters}")

        def status(text: str, where=where) -> None:
            if progress is not None:
                progress.describe(f"{where} · {text}")

        if algorithm == "two-level":
            result = two_level_kmeans(x, codes, gens, iters=iters, tol=tol, seeding=seeding, on_progress=status)
        else:
            result = kmeans(x, codes, gens, iters=iters, tol=tol, seeding=seeding, on_iteration=show)
        for i, job in enumerate(batch):
            lower = factors[job.layer][job.head].to(device)
            codebook = whitening.unwhiten(result.centroids[i].double(), lower).float().cpu()
            out[job.name] = (codebook, float(result.inertia[i]))
            if progress is not None:
                progress.advance(f"{label}L{job.layer} H{job.head} inertia {float(result.inertia[i]):.4g}")
    return out


def check_finite(x: torch.Tensor, batch: Sequence[Job]) -> None:
    """Refuse NaN or Inf in a batch's whitened keys ``x [len(batch), N, d]``, naming the first job that holds
    them (a batch spans several layers, so its first layer would mislead)."""
    finite = torch.isfinite(x).flatten(1).all(1)
    if not finite.all():
        job = batch[int((~finite).nonzero()[0])]
        raise DataError(f"calibration keys of layer {job.layer} (KV head {job.head}) contain NaN or Inf")


class _Progress:
    """A rich progress bar over heads (a no-op when quiet or not the main process)."""

    def __init__(self, total: int, enabled: bool, console: Console):
        self.bar = None
        if enabled:
            self.bar = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                console=console, transient=False,
            )
            self.task = self.bar.add_task("training codebooks", total=total)

    def __enter__(self):
        if self.bar is not None:
            self.bar.start()
        return self

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.stop()

    def describe(self, text: str) -> None:
        if self.bar is not None:
            self.bar.update(self.task, description=text)

    def advance(self, text: str) -> None:
        if self.bar is not None:
            self.bar.update(self.task, advance=1, description=text)


@contextmanager
def _partial_checkpoint(out: Path, overwrite: bool, state: Any) -> Iterator[Path]:
    """The partial directory every rank writes its part into: the main process owns it (lock, swap into
    ``out`` on success, removal on failure, :func:`atomic_directory`) and tells the other ranks its name."""
    if state.num_processes == 1:
        with atomic_directory(out, overwrite, writer="convert") as tmp:
            yield tmp
        return
    from accelerate.utils import broadcast_object_list

    if not state.is_main_process:
        name = broadcast_object_list([None])[0]
        if name is None:
            raise A2atsError(f"the main process could not start writing {out}")
        yield Path(name)
        return
    with ExitStack() as stack:
        try:
            tmp = stack.enter_context(atomic_directory(out, overwrite, writer="convert"))
        except BaseException:
            broadcast_object_list([None])  # the other ranks stop instead of waiting for a name
            raise
        broadcast_object_list([str(tmp)])
        yield tmp


def _state(device: torch.device):
    """accelerate's process state; CPU training asks for the gloo backend (``cpu=True``) under a launcher."""
    from accelerate import PartialState

    return PartialState(cpu=device.type == "cpu")


def convert(
    calibration: str | Path,
    out: str | Path,
    *,
    model: str | None = None,
    codes: int = DEFAULT_CODES,
    plain: bool = False,
    positions: str | int | None = "all",
    buckets: str = "log",
    iters: int = 20,
    tol: float = 1e-4,
    seed: int = 0,
    device: str = "cpu",
    light: bool = False,
    quiet: bool = False,
    allow_shrink: bool = False,
    overwrite: bool = False,
    compare_plain: bool = True,
    seeding: str = "kmeans||",
    algorithm: str = "auto",
    heads_per_batch: int | None = None,
    loaded: tuple[Any, Any] | None = None,
) -> Path:
    """Train codebooks on ``calibration`` and write a converted checkpoint to ``out``; returns ``out``.

    ``loaded`` passes an already loaded ``(model, tokenizer)`` (tests); otherwise the model comes from
    ``model`` or the calibration manifest. Under ``accelerate launch`` the heads are split across processes.
    ``algorithm``: ``lloyd`` (full Lloyd), ``two-level`` (coarse-to-fine, ≈√codes times cheaper per iteration)
    or ``auto`` (``lloyd`` on CUDA, ``two-level`` otherwise).
    """
    console = Console(stderr=True, quiet=quiet)
    out = Path(out)
    torch_device = resolve_device(device)
    state = _state(torch_device)
    main = state.is_main_process
    if state.num_processes > 1 and torch_device.type == "cuda":
        torch_device = state.device  # one GPU per rank
    if seeding not in SEEDINGS:
        raise A2atsError(f"unknown seeding {seeding!r}; choose from {SEEDINGS}")
    if iters < 1:
        raise A2atsError("--iters must be at least 1")
    algorithm = resolve_algorithm(algorithm, torch_device)
    check_output_dir(out, overwrite)  # fail fast; checked again under the lock
    calib = CalibrationSet(calibration)
    geo = calib.geometry
    pos = parse_positions(positions)
    bucket_spec = resolve_buckets(buckets, geo.max_position_embeddings)
    codes = choose_codes(codes, keys_per_head(calib), allow_shrink, console if main else Console(quiet=True))
    factors, jitters = layer_factors(calib, plain, pos)
    jittered = sum(1 for layer in jitters for j in layer if j > 0)
    if jittered and main:
        console.print(f"[yellow]note:[/] {jittered} query moment(s) needed Cholesky jitter (nearly singular H)")

    layers = calib.retrieval_layers
    jobs = [Job(layer, head) for layer in layers for head in range(geo.num_kv_heads)]
    per_head = keys_per_head(calib) * geo.head_dim * 4
    batch = heads_per_batch or max(1, min(len(jobs), HEAD_BYTES_PER_BATCH // max(1, per_head), 32))
    also_plain = compare_plain and not plain
    with _partial_checkpoint(out, overwrite, state) as tmp:
        with state.split_between_processes(jobs) as mine:
            mine = list(mine)
            total = len(mine) * (2 if also_plain else 1)
            with _Progress(total if main else 0, main and not quiet, console) as progress:
                common = dict(codes=codes, iters=iters, tol=tol, seed=seed, device=torch_device, seeding=seeding,
                              heads_per_batch=batch, algorithm=algorithm, progress=progress)
                trained = train_jobs(calib, mine, factors, salt=0, **common)
                plain_trained = {}
                if also_plain:
                    eye = {i: torch.eye(geo.head_dim, dtype=torch.float64).expand_as(f).clone() for i, f in factors.items()}
                    plain_trained = train_jobs(calib, mine, eye, salt=1, label="plain · ", **common)
        part: dict[str, torch.Tensor] = {}
        for name, (cb, inertia) in trained.items():
            part[f"qa.{name}"], part[f"qa_inertia.{name}"] = cb, torch.tensor([inertia])
        for name, (cb, _) in plain_trained.items():
            part[f"plain.{name}"] = cb
        write_safetensors(tmp / f"part-{state.process_index:03d}.safetensors", part)
        state.wait_for_everyone()
        if not main:
            return out

        merged: dict[str, torch.Tensor] = {}
        for path in sorted(tmp.glob("part-*.safetensors")):
            with safe_open(str(path), framework="pt") as f:
                merged.update({k: f.get_tensor(k) for k in f.keys()})
            path.unlink()

        def stack(prefix: str, layer: int) -> torch.Tensor:
            return torch.stack([merged[f"{prefix}.{layer}.{h}"] for h in range(geo.num_kv_heads)])

        codebooks = {layer: stack("qa", layer) for layer in layers}
        inertia = [stack("qa_inertia", layer).flatten().tolist() for layer in layers]
        plain_books = {layer: stack("plain", layer) for layer in layers} if also_plain else None
        factors32 = {i: f.float() for i, f in factors.items()}
        write_codebooks(tmp, codebooks, factors32)

        source, lm, tokenizer = _model(calib, model, loaded, light, console)
        policy = RuntimeSettings()  # the report's selection; the config's selection fields default to the same
        config = A2atsConfig(
            geometry=geo,
            codebook_size=codes,
            whitening="plain" if plain else "query_aware",
            buckets=bucket_spec.to_config(),
            retrieval_layers=layers,
            seed=seed,
            calibration={"path": str(Path(calibration).resolve()), "manifest": _manifest_summary(calib)},
        )
        check_geometry(config, lm)
        console.print("writing the model files" + (" (light: weights referenced)" if light else ""), highlight=False)
        weights = write_model_files(lm, tokenizer, tmp, light=light)
        config.model = {"source": source.to_dict(), "weights": weights}

        with _Progress(len(layers), not quiet, console) as progress:
            progress.describe("conversion report")
            report = build_report(
                calib, codebooks, factors32, plain_books, rotary(lm), bucket_spec, policy, attention_scale(lm),
                progress=lambda layer: progress.advance(f"report · layer {layer}"),
            )
        report["training"] = {
            "codes": codes, "iters": iters, "tol": tol, "seeding": seeding, "algorithm": algorithm,
            "coarse_cells": default_coarse(codes) if algorithm == "two-level" else None, "positions": pos,
            "keys_per_head": keys_per_head(calib), "inertia": inertia, "cholesky_jitter": jitters,
        }
        write_json(tmp / "report.json", report)
        print_report(report, console)
        config.extra = {"positions": pos, "processes": state.num_processes, "algorithm": algorithm, "report": {"mean_recall": report["mean"]}}
        write_config(tmp, config)  # last: only now does the folder load
    console.print(f"wrote {out}", highlight=False)
    return out


def _manifest_summary(calib: CalibrationSet) -> dict[str, Any]:
    m = calib.manifest
    keep = ("created", "tool_version", "model", "relative_positions", "tokens", "heldout", "key_dtype", "seed")
    return {k: m[k] for k in keep if k in m} | {"recipe": (m.get("recipe") or {}).get("name")}


def _model(
    calib: CalibrationSet, model: str | None, loaded: tuple[Any, Any] | None, light: bool, console: Console
) -> tuple[ModelSource, Any, Any]:
    """The model (for its files, rotary embedding and geometry check) and tokenizer."""
    if loaded is not None:
        lm, tok = loaded
        name = str(getattr(lm.config, "_name_or_path", "") or "in-memory")
        return ModelSource(name, None, name), lm, tok
    if model is None:
        recorded = calib.manifest.get("model") or {}
        if not recorded.get("path_or_id"):
            raise A2atsError("the calibration does not record its model; pass --model")
        source = ModelSource(recorded["path_or_id"], recorded.get("gguf_file"), recorded.get("display_name", ""))
    else:
        source = resolve_source(model)
    console.print(f"loading {source.display_name or source.path_or_id}", highlight=False)
    return source, load_model(source), load_tokenizer(source)
