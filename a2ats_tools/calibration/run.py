"""The calibration stage as a Python function: :func:`calibrate`. The CLI command is a thin wrapper."""

from __future__ import annotations

import contextlib
import io
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

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


class _Progress:
    def __init__(self, quiet: bool, total: int):
        self.bar = None
        if not quiet:
            self.bar = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                TextColumn("{task.completed:,.0f}/{task.total:,.0f} tok"),
                TextColumn("{task.fields[rate]}"),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                console=Console(stderr=True),
            )
            self.task = self.bar.add_task("calibrating", total=total, rate="")

    def __enter__(self):
        if self.bar:
            self.bar.start()
        return self

    def __exit__(self, *exc):
        if self.bar:
            self.bar.stop()

    def update(self, description: str | None = None, advance: int = 0) -> None:
        if not self.bar:
            return
        kwargs: dict[str, Any] = {"advance": advance}
        if description:
            kwargs["description"] = description
        self.bar.update(self.task, **kwargs)
        task = self.bar.tasks[0]
        if task.speed:
            self.bar.update(self.task, rate=f"{task.speed:,.0f} tok/s")


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
    quiet: bool = False,
    allow_few_tokens: bool = False,
    loaded: tuple[Any, Any] | None = None,
) -> CalibrationSet:
    """Run the model over the recipe's text and write a calibration directory; returns it, opened.

    ``tokens`` scales the recipe's training-token mix to that total; ``sources`` adds local files sources
    (``PATH`` or ``PATH=TOKENS``). Fewer than :data:`MIN_TOKENS` training tokens, asked for or obtained, are an
    error unless ``allow_few_tokens``. ``loaded`` passes an already loaded ``(model, tokenizer)`` pair (tests).
    """
    console = Console(stderr=True)
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
    torch_device, torch_dtype = resolve_device(device), resolve_dtype(dtype)
    out = Path(out)
    check_output_dir(out, overwrite)  # fail fast, before loading the model; checked again under the lock

    if loaded is not None:
        lm, tokenizer = loaded
        source = ModelSource(str(getattr(lm.config, "_name_or_path", "in-memory")), None, "in-memory model")
        check_supported(lm)
    else:
        source = resolve_source(model, gguf_file)
        if not quiet:
            console.print(f"loading {source.display_name or source.path_or_id} ...", highlight=False)
        # transformers' GGUF loader draws its own tqdm bar on stderr: --quiet silences it too
        with contextlib.redirect_stderr(io.StringIO()) if quiet else contextlib.nullcontext():
            tokenizer = load_tokenizer(source)
            lm = load_model(source, dtype=torch_dtype, device=torch_device)
    geo = geometry(lm)
    rel_positions = positions if isinstance(positions, list) else parse_positions(positions, geo.max_position_embeddings)
    max_len = int(max_length or rec.max_length or geo.max_position_embeddings)
    chunk = int(chunk_size or rec.chunk_size or max_len)
    if max_len < 2 or chunk < 1:
        raise A2atsError(f"--max-length must be >= 2 and --chunk-size >= 1 (got {max_len}, {chunk})")

    # built beside ``out`` and swapped in once complete: a failed run leaves the previous calibration whole
    with atomic_directory(out, overwrite, writer="calibrate") as tmp:
        _write_calibration(
            tmp, rec, lm, tokenizer, source, geo, rel_positions, max_len, chunk, torch_device, dtype, seed, quiet,
            allow_few_tokens, console,
        )
    return CalibrationSet(out)


def _write_calibration(
    directory: Path,
    rec: Recipe,
    lm: Any,
    tokenizer: Any,
    source: ModelSource,
    geo: Geometry,
    rel_positions: list[int],
    max_len: int,
    chunk: int,
    device: torch.device,
    dtype: str,
    seed: int,
    quiet: bool,
    allow_few_tokens: bool,
    console: Console,
) -> None:
    """Run the recipe's training and held-out text through ``lm`` and write the layers and manifest into the
    (empty) ``directory``."""
    torch.manual_seed(seed)
    random.seed(seed)
    layers = retrieval_layers(lm)
    acc = StatsAccumulator(directory, geo, layers)
    held_spec = rec.heldout_source()
    held_len = min(rec.heldout.length, max_len)
    held_needed = rec.heldout.sequences * held_len if held_spec is not None else 0
    used: dict[str, int] = {}
    heldout_tokens: list[int] = []
    try:
        with _Progress(quiet, rec.total_tokens + held_needed) as progress:
            for spec in rec.sources:
                used[spec.label] = _train_on_source(
                    spec, acc, lm, tokenizer, seed, max_len, chunk, device, progress,
                    heldout_tokens if spec is held_spec else None, held_needed,
                )
            _check_tokens_used(rec, used, allow_few_tokens, console)
            heldout = _run_heldout(acc, lm, heldout_tokens, rec, held_len, chunk, device, progress, console)
            progress.update("writing layers")
            acc.finish(rotary(lm), rel_positions)
    except BaseException:
        acc.discard_shards()
        raise
    write_manifest(
        directory,
        model={**source.to_dict(), "dtype": dtype, "device": str(device)},
        geometry=geo,
        relative_positions=rel_positions,
        tokens_by_source=used,
        heldout=heldout,
        key_dtype=str(KEY_DTYPE).removeprefix("torch."),
        recipe=rec.to_dict(),
        seed=seed,
        retrieval_layers=layers,
        extra={
            "tokens_requested": {s.label: s.tokens for s in rec.sources},
            "heldout_source": held_spec.label if held_spec is not None else None,
            "max_length": max_len,
            "chunk_size": chunk,
            "default_relative_position": 2048 if 2048 in rel_positions else rel_positions[0],
        },
    )


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


def _check_tokens_used(rec: Recipe, used: dict[str, int], allow_few_tokens: bool, console: Console) -> None:
    """After training: refuse no tokens at all, and too few unless allowed; warn about each source that gave
    less than asked for."""
    total = sum(used.values())
    if total == 0:
        raise DataError(f"the calibration data of recipe {rec.name} is empty: no tokens to calibrate on")
    short = [f"source {s.label} gave {used[s.label]:,} of the {s.tokens:,} tokens asked for" for s in rec.sources
             if used[s.label] < s.tokens]
    if few_tokens(total, allow_few_tokens, f"the calibration data gave {total:,} training tokens ({'; '.join(short)})"):
        console.print(f"[yellow]warning:[/] calibrating on {total:,} tokens, below the {MIN_TOKENS:,} minimum "
                      f"(--allow-few-tokens): convert needs --codes {total} or fewer, or --allow-shrink",
                      highlight=False)
    for line in short:
        console.print(f"[yellow]warning:[/] {line}; continuing with fewer", highlight=False)


def _train_on_source(
    spec: SourceSpec,
    acc: StatsAccumulator,
    lm: Any,
    tokenizer: Any,
    seed: int,
    max_len: int,
    chunk: int,
    device: torch.device,
    progress: _Progress,
    heldout_tokens: list[int] | None,
    held_needed: int,
) -> int:
    """Feed ``spec.tokens`` training tokens of one source; if it is the held-out source, then collect the
    held-out tokens from the documents that follow (never used for training). Returns the tokens used."""
    label = spec.label
    progress.update(f"{label}" + (" (sampling)" if spec.kind == "generated" else ""))
    used = 0
    if spec.tokens == 0 and heldout_tokens is None:
        return 0
    docs = _pieces(documents(spec, tokenizer, lm, seed), max_len)
    for piece in docs:
        if used < spec.tokens:
            piece = piece[: spec.tokens - used]
            with capturing(lm, acc.training_sink):  # not around the source: generation must not be captured
                run_document(lm, piece, chunk, device)
            used += len(piece)
            progress.update(label, advance=len(piece))
            continue
        if heldout_tokens is None or len(heldout_tokens) >= held_needed:
            break
        heldout_tokens.extend(piece[: held_needed - len(heldout_tokens)])
    return used


def _run_heldout(
    acc: StatsAccumulator,
    lm: Any,
    tokens: list[int],
    rec: Recipe,
    length: int,
    chunk: int,
    device: torch.device,
    progress: _Progress,
    console: Console,
) -> dict[str, int]:
    """Capture all keys and ``rec.heldout.queries`` queries of each held-out sequence (packed documents)."""
    wanted = rec.heldout.sequences if rec.heldout_source() is not None else 0
    count = min(wanted, len(tokens) // length) if length else 0
    if count == 0 and wanted and len(tokens) >= 64:
        count, length = 1, len(tokens)
    if count < wanted:
        console.print(
            f"[yellow]warning:[/] held-out data gave {count} of the {wanted} sequences asked for "
            f"({len(tokens):,} tokens)",
            highlight=False,
        )
    positions = heldout_query_positions(length, rec.heldout.queries) if count else torch.zeros(0, dtype=torch.long)
    progress.update("held-out")
    with capturing(lm, acc.heldout_sink):
        for s in range(count):
            acc.begin_heldout(positions)
            run_document(lm, tokens[s * length : (s + 1) * length], chunk, device)
            acc.end_heldout()
            progress.update(advance=length)
    return {"sequences": count, "length": length if count else 0, "queries": int(positions.numel())}
