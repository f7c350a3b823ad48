"""The calibration stage as a Python function: :func:`calibrate`. The CLI command is a thin wrapper."""

from __future__ import annotations

import contextlib
import io
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..compat import cache_kwargs
from ..defaults import MIN_TOKENS
from ..errors import A2atsError, DataError
from ..io import atomic_directory, check_output_dir
from ..models import (
    Geometry,
    ModelSource,
    check_supported,
    geometry,
    load_model,
    load_tokenizer,
    resolve_source,
    retrieval_layers,
    rotary,
)
from ..reporting import Bar, Reporter
from ..rope import DistanceBuckets
from .accumulate import KEY_DTYPE, StatsAccumulator
from .capture import capturing
from .format import CalibrationSet, write_manifest
from .recipe import Recipe, load_recipe, parse_source_option
from .sources import SourceSpec, documents

DEFAULT_POSITIONS = "2048,log"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_positions(spec: str, max_position_embeddings: int) -> list[int]:
    """``2048``, ``2048,4096``, ``log`` (log-spaced bucket centres) or a mix like ``2048,log``: sorted, unique."""
    positions: set[int] = set()
    for part in (p.strip() for p in str(spec).split(",")):
        if not part:
            continue
        if part.lower() == "log":
            positions.update(DistanceBuckets.log_spaced(max_position_embeddings).centres)
        elif part.isdigit():
            positions.add(int(part))
        else:
            raise A2atsError(f"--positions: {part!r} is neither a number nor 'log' (example: --positions 2048,log)")
    if not positions:
        raise A2atsError("--positions is empty (example: --positions 2048,log)")
    return sorted(positions)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise A2atsError("--device cuda was asked for but no CUDA GPU is available")
    try:
        return torch.device(device)
    except RuntimeError:
        raise A2atsError(f"--device {device!r} is not a device (use cpu, cuda or auto)") from None


def resolve_dtype(dtype: str) -> torch.dtype:
    if dtype not in DTYPES:
        raise A2atsError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


@torch.no_grad()
def run_document(model: Any, ids: list[int], chunk_size: int, device: torch.device) -> None:
    """Run one document through the model in chunks with a shared KV cache (exact causal attention)."""
    from transformers import DynamicCache

    tokens = torch.tensor([ids], dtype=torch.long, device=device)
    cache = DynamicCache(config=model.config)
    for start in range(0, tokens.shape[1], chunk_size):
        model(input_ids=tokens[:, start : start + chunk_size], **cache_kwargs(cache), use_cache=True, logits_to_keep=1)


def _pieces(docs: Iterator[list[int]], max_length: int) -> Iterator[list[int]]:
    """Documents cut into consecutive pieces of at most ``max_length`` tokens (each starts at position 0)."""
    for doc in docs:
        for start in range(0, len(doc), max_length):
            piece = doc[start : start + max_length]
            if len(piece) >= 2:
                yield piece


def heldout_query_positions(length: int, count: int) -> torch.Tensor:
    """``count`` positions spread evenly over ``[length/4, length)``."""
    lo = length // 4
    count = min(count, length - lo)
    return torch.linspace(lo, length - 1, count).round().long().unique()


@dataclass(frozen=True)
class _Run:
    """One calibration run: the recipe, the model and the resolved options."""

    rec: Recipe
    lm: Any
    tokenizer: Any
    source: ModelSource
    geo: Geometry
    positions: list[int]  # the relative positions of the WRoPE query moments
    max_len: int
    chunk: int
    device: torch.device
    dtype: str
    seed: int
    allow_few_tokens: bool


def calibrate(
    out: str | Path,
    *,
    model: str | None = None,
    gguf_file: str | None = None,
    recipe: str | Recipe = "default",
    tokens: int | None = None,
    sources: list[str] | None = None,
    positions: str | list[int] = DEFAULT_POSITIONS,
    seed: int = 0,
    max_length: int | None = None,
    chunk_size: int | None = None,
    device: str = "cpu",
    dtype: str = "float32",
    overwrite: bool = False,
    allow_few_tokens: bool = False,
    loaded: tuple[Any, Any] | None = None,
    reporter: Reporter | None = None,
) -> CalibrationSet:
    """Run the model over the recipe's text and write a calibration directory; returns it, opened.

    ``tokens`` scales the recipe's training-token mix to that total; ``sources`` adds local files sources
    (``PATH`` or ``PATH=TOKENS``). Fewer than :data:`MIN_TOKENS` training tokens, asked for or obtained, are an
    error unless ``allow_few_tokens``. ``loaded`` passes an already loaded ``(model, tokenizer)`` pair (tests).
    ``reporter`` shows progress and warnings (default: nothing).
    """
    reporter = reporter or Reporter()
    rec = _recipe(recipe, sources, tokens, allow_few_tokens)
    torch_device, torch_dtype = resolve_device(device), resolve_dtype(dtype)
    out = Path(out)
    check_output_dir(out, overwrite)  # fail fast, before loading the model; checked again under the lock
    source, lm, tokenizer = _load(model, gguf_file, loaded, torch_dtype, torch_device, reporter)
    geo = geometry(lm)
    rel_positions = positions if isinstance(positions, list) else parse_positions(positions, geo.max_position_embeddings)
    max_len = int(max_length or rec.max_length or geo.max_position_embeddings)
    chunk = int(chunk_size or rec.chunk_size or max_len)
    if max_len < 2 or chunk < 1:
        raise A2atsError(f"--max-length must be >= 2 and --chunk-size >= 1 (got {max_len}, {chunk})")
    run = _Run(rec, lm, tokenizer, source, geo, rel_positions, max_len, chunk, torch_device, dtype, seed, allow_few_tokens)
    # built beside ``out`` and swapped in once complete: a failed run leaves the previous calibration whole
    with atomic_directory(out, overwrite, writer="calibrate") as tmp:
        _write_calibration(tmp, run, reporter)
    return CalibrationSet(out)


def _recipe(recipe: str | Recipe, sources: list[str] | None, tokens: int | None, allow_few_tokens: bool) -> Recipe:
    """The recipe with the added ``sources`` and scaled to ``tokens``; refuses one without sources, with two of a
    name, or asking for too few tokens."""
    rec = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    if sources:
        rec = rec.with_sources([parse_source_option(s, default_tokens=16384) for s in sources])
    if tokens is not None:
        rec = rec.scaled(tokens)
    if not rec.sources:
        raise DataError(f"recipe {rec.name} has no sources; add one with --source PATH")
    labels = [s.label for s in rec.sources]
    if len(set(labels)) != len(labels):
        dup = next(label for label in labels if labels.count(label) > 1)
        raise DataError(f"recipe {rec.name}: two sources are named {dup!r}; give them distinct 'name's")
    few_tokens(rec.total_tokens, allow_few_tokens, f"recipe {rec.name} asks for {rec.total_tokens:,} training tokens")
    return rec


def _load(
    model: str | None, gguf_file: str | None, loaded: tuple[Any, Any] | None, dtype: torch.dtype,
    device: torch.device, reporter: Reporter,
) -> tuple[ModelSource, Any, Any]:
    """The model's source, the model and its tokenizer: ``loaded``, or loaded from ``model``."""
    if loaded is not None:
        lm, tokenizer = loaded
        source = ModelSource(str(getattr(lm.config, "_name_or_path", "in-memory")), None, "in-memory model")
        check_supported(lm)
        return source, lm, tokenizer
    source = resolve_source(model, gguf_file)
    reporter.info(f"loading {source.display_name or source.path_or_id} ...")
    # transformers' GGUF loader draws its own tqdm bar on stderr: a quiet reporter silences it too
    with contextlib.redirect_stderr(io.StringIO()) if reporter.quiet else contextlib.nullcontext():
        tokenizer = load_tokenizer(source)
        lm = load_model(source, dtype=dtype, device=device)
    return source, lm, tokenizer


def _write_calibration(directory: Path, run: _Run, reporter: Reporter) -> None:
    """Run the recipe's training and held-out text through the model and write the layers and manifest into
    the (empty) ``directory``."""
    torch.manual_seed(run.seed)
    random.seed(run.seed)
    layers = retrieval_layers(run.lm)
    acc = StatsAccumulator(directory, run.geo, layers)
    try:
        used, heldout = _capture(acc, run, reporter)
    except BaseException:
        acc.discard_shards()
        raise
    rec, held_spec = run.rec, run.rec.heldout_source()
    write_manifest(
        directory,
        model={**run.source.to_dict(), "dtype": run.dtype, "device": str(run.device)},
        geometry=run.geo,
        relative_positions=run.positions,
        tokens_by_source=used,
        heldout=heldout,
        key_dtype=str(KEY_DTYPE).removeprefix("torch."),
        recipe=rec.to_dict(),
        seed=run.seed,
        retrieval_layers=layers,
        extra={
            "tokens_requested": {s.label: s.tokens for s in rec.sources},
            "heldout_source": held_spec.label if held_spec is not None else None,
            "max_length": run.max_len,
            "chunk_size": run.chunk,
            "default_relative_position": 2048 if 2048 in run.positions else run.positions[0],
        },
    )


def _capture(acc: StatsAccumulator, run: _Run, reporter: Reporter) -> tuple[dict[str, int], dict[str, int]]:
    """Feed every source, then the held-out sequences, into ``acc`` and write its layers; returns the training
    tokens used per source and the held-out shape."""
    rec = run.rec
    held_spec = rec.heldout_source()
    held_len = min(rec.heldout.length, run.max_len)
    held_needed = rec.heldout.sequences * held_len if held_spec is not None else 0
    used: dict[str, int] = {}
    heldout_tokens: list[int] = []
    with reporter.progress("calibrating", rec.total_tokens + held_needed, unit="tok") as bar:
        for spec in rec.sources:
            held = heldout_tokens if spec is held_spec else None
            used[spec.label] = _train_on_source(spec, acc, run, bar, held, held_needed)
        _check_tokens_used(rec, used, run.allow_few_tokens, reporter)
        heldout = _run_heldout(acc, run, heldout_tokens, held_len, bar, reporter)
        bar.describe("writing layers")
        acc.finish(rotary(run.lm), run.positions)
    return used, heldout


def few_tokens(count: int, allow_few_tokens: bool, what: str) -> bool:
    """Whether ``count`` training tokens fall short of :data:`MIN_TOKENS`; raises a one-line
    :class:`DataError` (``what`` first) unless ``allow_few_tokens``. Convert needs a key per code, so a
    calibration below the minimum fails there with the default codebook."""
    if count >= MIN_TOKENS:
        return False
    if not allow_few_tokens:
        raise DataError(
            f"{what}, below the {MIN_TOKENS:,} a calibration needs (one key per code of convert's default "
            "codebook); add data or raise --tokens, or pass --allow-few-tokens"
        )
    return True


def _check_tokens_used(rec: Recipe, used: dict[str, int], allow_few_tokens: bool, reporter: Reporter) -> None:
    """After training: refuse no tokens at all, and too few unless allowed; warn about each source that gave
    less than asked for."""
    total = sum(used.values())
    if total == 0:
        raise DataError(f"the calibration data of recipe {rec.name} is empty: no tokens to calibrate on")
    short = [f"source {s.label} gave {used[s.label]:,} of the {s.tokens:,} tokens asked for" for s in rec.sources
             if used[s.label] < s.tokens]
    if few_tokens(total, allow_few_tokens, f"the calibration data gave {total:,} training tokens ({'; '.join(short)})"):
        reporter.warn(f"calibrating on {total:,} tokens, below the {MIN_TOKENS:,} minimum "
                      f"(--allow-few-tokens): convert needs --codes {total} or fewer, or --allow-shrink")
    for line in short:
        reporter.warn(f"{line}; continuing with fewer")


def _train_on_source(
    spec: SourceSpec,
    acc: StatsAccumulator,
    run: _Run,
    bar: Bar,
    heldout_tokens: list[int] | None,
    held_needed: int,
) -> int:
    """Feed ``spec.tokens`` training tokens of one source; if it is the held-out source, then collect the
    held-out tokens from the documents that follow (never used for training). Returns the tokens used."""
    label = spec.label
    bar.describe(f"{label}" + (" (sampling)" if spec.kind == "generated" else ""))
    used = 0
    if spec.tokens == 0 and heldout_tokens is None:
        return 0
    docs = _pieces(documents(spec, run.tokenizer, run.lm, run.seed), run.max_len)
    for piece in docs:
        if used < spec.tokens:
            piece = piece[: spec.tokens - used]
            with capturing(run.lm, acc.training_sink):  # not around the source: generation must not be captured
                run_document(run.lm, piece, run.chunk, run.device)
            used += len(piece)
            bar.advance(len(piece), label)
            continue
        if heldout_tokens is None or len(heldout_tokens) >= held_needed:
            break
        heldout_tokens.extend(piece[: held_needed - len(heldout_tokens)])
    return used


def _run_heldout(
    acc: StatsAccumulator, run: _Run, tokens: list[int], length: int, bar: Bar, reporter: Reporter
) -> dict[str, int]:
    """Capture all keys and ``rec.heldout.queries`` queries of each held-out sequence (packed documents)."""
    rec = run.rec
    wanted = rec.heldout.sequences if rec.heldout_source() is not None else 0
    count = min(wanted, len(tokens) // length) if length else 0
    if count == 0 and wanted and len(tokens) >= 64:
        count, length = 1, len(tokens)
    if count < wanted:
        reporter.warn(f"held-out data gave {count} of the {wanted} sequences asked for ({len(tokens):,} tokens)")
    positions = heldout_query_positions(length, rec.heldout.queries) if count else torch.zeros(0, dtype=torch.long)
    bar.describe("held-out")
    with capturing(run.lm, acc.heldout_sink):
        for s in range(count):
            acc.begin_heldout(positions)
            run_document(run.lm, tokens[s * length : (s + 1) * length], run.chunk, run.device)
            acc.end_heldout()
            bar.advance(length)
    return {"sequences": count, "length": length if count else 0, "queries": int(positions.numel())}
