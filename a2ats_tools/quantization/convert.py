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
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from ..artifacts.checkpoint import A2atsConfig, write_codebooks, write_config
from ..artifacts.model_files import check_geometry, write_model_files
from ..calibration.format import KEYS, QUERY_COUNT, WROPE_QUERY_MOMENT, CalibrationSet, layer_file
from ..defaults import DEFAULT_CODES
from ..errors import A2atsError, DataError
from ..io import atomic_directory, check_output_dir, open_safetensors, write_json, write_safetensors
from ..models import ModelSource, attention_scale, load_model, load_tokenizer, resolve_source, rotary
from ..reporting import Bar, Reporter
from ..rope import DistanceBuckets
from ..runtime.settings import RuntimeSettings
from . import whitening
from .kmeans import SEEDINGS, head_generator, kmeans
from .report import build_report, show_report
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


def choose_codes(codes: int, available: int, allow_shrink: bool, reporter: Reporter) -> int:
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
    reporter.warn(f"only {available} keys per head: shrinking the codebook from {codes} to {shrunk} codes")
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
    progress: Bar | None = None,
    label: str = "",
) -> dict[str, tuple[torch.Tensor, float]]:
    """Train one codebook per job: ``{job.name: (codebook [C, d] float32 in key space, inertia)}``; ``progress``
    advances once per job."""
    bar = progress or Bar()
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
            bar.describe(f"{where} · iter {step + 1}/{iters}")

        def status(text: str, where=where) -> None:
            bar.describe(f"{where} · {text}")

        if algorithm == "two-level":
            result = two_level_kmeans(x, codes, gens, iters=iters, tol=tol, seeding=seeding, on_progress=status)
        else:
            result = kmeans(x, codes, gens, iters=iters, tol=tol, seeding=seeding, on_iteration=show)
        for i, job in enumerate(batch):
            lower = factors[job.layer][job.head].to(device)
            codebook = whitening.unwhiten(result.centroids[i].double(), lower).float().cpu()
            out[job.name] = (codebook, float(result.inertia[i]))
            bar.advance(description=f"{label}L{job.layer} H{job.head} inertia {float(result.inertia[i]):.4g}")
    return out


def check_finite(x: torch.Tensor, batch: Sequence[Job]) -> None:
    """Refuse NaN or Inf in a batch's whitened keys ``x [len(batch), N, d]``, naming the first job that holds
    them (a batch spans several layers, so its first layer would mislead)."""
    finite = torch.isfinite(x).flatten(1).all(1)
    if not finite.all():
        job = batch[int((~finite).nonzero()[0])]
        raise DataError(f"calibration keys of layer {job.layer} (KV head {job.head}) contain NaN or Inf")


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


@dataclass(frozen=True)
class Training:
    """How the codebooks are trained: convert's options, resolved."""

    codes: int
    iters: int
    tol: float
    seed: int
    seeding: str
    algorithm: str
    device: torch.device
    heads_per_batch: int

    def train(self, calib: CalibrationSet, jobs: Sequence[Job], factors: dict[int, torch.Tensor], *, salt: int,
              progress: Bar, label: str = "") -> dict[str, tuple[torch.Tensor, float]]:
        return train_jobs(
            calib, jobs, factors, codes=self.codes, iters=self.iters, tol=self.tol, seed=self.seed, salt=salt,
            device=self.device, seeding=self.seeding, heads_per_batch=self.heads_per_batch,
            algorithm=self.algorithm, progress=progress, label=label,
        )

    def record(self, positions: str | int, keys: int, inertia: list[list[float]], jitters: list[list[float]]) -> dict:
        """The report's ``training`` section."""
        return {
            "codes": self.codes, "iters": self.iters, "tol": self.tol, "seeding": self.seeding,
            "algorithm": self.algorithm,
            "coarse_cells": default_coarse(self.codes) if self.algorithm == "two-level" else None,
            "positions": positions, "keys_per_head": keys, "inertia": inertia, "cholesky_jitter": jitters,
        }


@dataclass(frozen=True)
class Codebooks:
    """The merged codebooks of every retrieved layer, ``{layer: [Hkv, C, d]}``, and each head's inertia."""

    query_aware: dict[int, torch.Tensor]
    inertia: list[list[float]]  # one row per retrieved layer, in layer order
    plain: dict[int, torch.Tensor] | None  # for the report; None without --compare-plain


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
    allow_shrink: bool = False,
    overwrite: bool = False,
    compare_plain: bool = True,
    seeding: str = "kmeans||",
    algorithm: str = "auto",
    heads_per_batch: int | None = None,
    settings: str | None = None,
    loaded: tuple[Any, Any] | None = None,
    reporter: Reporter | None = None,
) -> Path:
    """Train codebooks on ``calibration`` and write a converted checkpoint to ``out``; returns ``out``.

    ``loaded`` passes an already loaded ``(model, tokenizer)`` (tests); otherwise the model comes from
    ``model`` or the calibration manifest. Under ``accelerate launch`` the heads are split across processes.
    ``algorithm``: ``lloyd`` (full Lloyd), ``two-level`` (coarse-to-fine, ≈√codes times cheaper per iteration)
    or ``auto`` (``lloyd`` on CUDA, ``two-level`` otherwise). ``settings`` (``"rerank=8,aggregation=max"``)
    records decode defaults in the checkpoint (checked before any training). ``reporter`` shows progress, warnings and the
    report table (default: nothing).
    """
    reporter = reporter or Reporter()
    out = Path(out)
    state, torch_device, algorithm = _setup(device, seeding, iters, algorithm)
    check_output_dir(out, overwrite)  # fail fast; checked again under the lock
    calib = CalibrationSet(calibration)
    recorded = _recorded_settings(calib, settings)
    shown = reporter if state.is_main_process else Reporter()  # the other ranks train in silence
    pos = parse_positions(positions)
    bucket_spec = resolve_buckets(buckets, calib.geometry.max_position_embeddings)
    codes = choose_codes(codes, keys_per_head(calib), allow_shrink, shown)
    factors, jitters = layer_factors(calib, plain, pos)
    _note_jitter(jitters, shown)
    jobs = [Job(layer, head) for layer in calib.retrieval_layers for head in range(calib.geometry.num_kv_heads)]
    training = Training(codes, iters, tol, seed, seeding, algorithm, torch_device,
                        heads_per_batch or _heads_per_batch(calib, len(jobs)))
    also_plain = compare_plain and not plain
    with _partial_checkpoint(out, overwrite, state) as tmp:
        _train_part(tmp, calib, jobs, factors, training, also_plain, state, shown)
        state.wait_for_everyone()
        if not state.is_main_process:
            return out
        books = _merge_parts(tmp, calib, also_plain)
        factors32 = {i: f.float() for i, f in factors.items()}
        write_codebooks(tmp, books.query_aware, factors32)
        config = replace(_config(calib, calibration, codes, plain, bucket_spec, seed), **recorded)
        lm = _write_model(tmp, config, calib, model, loaded, light, reporter)
        report = _report(calib, books, factors32, lm, bucket_spec, reporter)
        report["training"] = training.record(pos, keys_per_head(calib), books.inertia, jitters)
        write_json(tmp / REPORT_FILE, report)
        show_report(report, reporter)
        config.extra = {"positions": pos, "processes": state.num_processes, "algorithm": algorithm,
                        "report": {"mean_recall": report["mean"]}}
        write_config(tmp, config)  # last: only now does the folder load
    reporter.info(f"wrote {out}")
    return out


def _recorded_settings(calib: CalibrationSet, spec: str | None) -> dict[str, Any]:
    """``--settings`` as checkpoint fields, checked against the runtime's rules."""
    if not spec:
        return {}
    return RuntimeSettings(max_distance=calib.geometry.max_position_embeddings).recorded(spec)


def _setup(device: str, seeding: str, iters: int, algorithm: str) -> tuple[Any, torch.device, str]:
    """accelerate's process state, the device this process trains on (one GPU per rank under a launcher) and
    the k-means algorithm; refuses an unknown seeding or fewer than one iteration."""
    torch_device = resolve_device(device)
    state = _state(torch_device)
    if state.num_processes > 1 and torch_device.type == "cuda":
        torch_device = state.device
    if seeding not in SEEDINGS:
        raise A2atsError(f"unknown seeding {seeding!r}; choose from {SEEDINGS}")
    if iters < 1:
        raise A2atsError("--iters must be at least 1")
    return state, torch_device, resolve_algorithm(algorithm, torch_device)


def _note_jitter(jitters: list[list[float]], reporter: Reporter) -> None:
    jittered = sum(1 for layer in jitters for j in layer if j > 0)
    if jittered:
        reporter.note(f"{jittered} query moment(s) needed Cholesky jitter (nearly singular H)")


def _heads_per_batch(calib: CalibrationSet, jobs: int) -> int:
    """As many heads per batch as keep their whitened keys under :data:`HEAD_BYTES_PER_BATCH` (at most 32)."""
    per_head = keys_per_head(calib) * calib.geometry.head_dim * 4
    return max(1, min(jobs, HEAD_BYTES_PER_BATCH // max(1, per_head), 32))


def _train_part(
    tmp: Path,
    calib: CalibrationSet,
    jobs: list[Job],
    factors: dict[int, torch.Tensor],
    training: Training,
    also_plain: bool,
    state: Any,
    reporter: Reporter,
) -> None:
    """Train this process's share of ``jobs`` (query-aware, then plain VQ for the report) and write it to
    ``tmp`` as ``part-RANK.safetensors``."""
    with state.split_between_processes(jobs) as mine:
        mine = list(mine)
        with reporter.progress("training codebooks", len(mine) * (2 if also_plain else 1)) as bar:
            trained = training.train(calib, mine, factors, salt=0, progress=bar)
            plain_trained = {}
            if also_plain:
                d = calib.geometry.head_dim
                eye = {i: torch.eye(d, dtype=torch.float64).expand_as(f).clone() for i, f in factors.items()}
                plain_trained = training.train(calib, mine, eye, salt=1, progress=bar, label="plain · ")
    part: dict[str, torch.Tensor] = {}
    for name, (cb, inertia) in trained.items():
        part[f"qa.{name}"], part[f"qa_inertia.{name}"] = cb, torch.tensor([inertia])
    for name, (cb, _) in plain_trained.items():
        part[f"plain.{name}"] = cb
    write_safetensors(tmp / f"part-{state.process_index:03d}.safetensors", part)


def _merge_parts(tmp: Path, calib: CalibrationSet, also_plain: bool) -> Codebooks:
    """Every process's part, read and removed from ``tmp``, stacked by layer."""
    merged: dict[str, torch.Tensor] = {}
    for path in sorted(tmp.glob("part-*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            merged.update({k: f.get_tensor(k) for k in f.keys()})
        path.unlink()

    def stack(prefix: str, layer: int) -> torch.Tensor:
        return torch.stack([merged[f"{prefix}.{layer}.{h}"] for h in range(calib.geometry.num_kv_heads)])

    layers = calib.retrieval_layers
    return Codebooks(
        query_aware={layer: stack("qa", layer) for layer in layers},
        inertia=[stack("qa_inertia", layer).flatten().tolist() for layer in layers],
        plain={layer: stack("plain", layer) for layer in layers} if also_plain else None,
    )


def _config(
    calib: CalibrationSet, calibration: str | Path, codes: int, plain: bool, buckets: DistanceBuckets, seed: int
) -> A2atsConfig:
    """The checkpoint's config, less the model files and the training extras."""
    return A2atsConfig(
        geometry=calib.geometry,
        codebook_size=codes,
        whitening="plain" if plain else "query_aware",
        buckets=buckets.to_config(),
        retrieval_layers=calib.retrieval_layers,
        seed=seed,
        calibration={"path": str(Path(calibration).resolve()), "manifest": _manifest_summary(calib)},
    )


def _write_model(
    tmp: Path, config: A2atsConfig, calib: CalibrationSet, model: str | None, loaded: tuple[Any, Any] | None,
    light: bool, reporter: Reporter,
) -> Any:
    """Load the model, check it against the calibration, write its files into ``tmp`` and record them in
    ``config``; returns the model (for its rotary embedding and softmax scale)."""
    source, lm, tokenizer = _model(calib, model, loaded, reporter)
    check_geometry(config, lm)
    reporter.info("writing the model files" + (" (light: weights referenced)" if light else ""))
    weights = write_model_files(lm, tokenizer, tmp, light=light)
    config.model = {"source": source.to_dict(), "weights": weights}
    return lm


def _report(
    calib: CalibrationSet, books: Codebooks, factors: dict[int, torch.Tensor], lm: Any, buckets: DistanceBuckets,
    reporter: Reporter,
) -> dict[str, Any]:
    """The conversion report under the default runtime selection (the config's selection fields default to
    the same)."""
    with reporter.progress("conversion report", len(calib.retrieval_layers)) as bar:
        return build_report(
            calib, books.query_aware, factors, books.plain, rotary(lm), buckets, RuntimeSettings(),
            attention_scale(lm), progress=lambda layer: bar.advance(description=f"report · layer {layer}"),
        )


def _manifest_summary(calib: CalibrationSet) -> dict[str, Any]:
    m = calib.manifest
    keep = ("created", "tool_version", "model", "relative_positions", "tokens", "heldout", "key_dtype", "seed")
    return {k: m[k] for k in keep if k in m} | {"recipe": (m.get("recipe") or {}).get("name")}


def _model(
    calib: CalibrationSet, model: str | None, loaded: tuple[Any, Any] | None, reporter: Reporter
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
    reporter.info(f"loading {source.display_name or source.path_or_id}")
    return source, load_model(source), load_tokenizer(source)
