"""Which points a bench runs: contexts × batches × cache kinds, less the points it cannot time (with a note).

A cache kind says where a point's dense cache comes from: ``real`` (a real chunked prefill of the context),
``real:MAX`` (the same, for contexts up to MAX) or ``synthetic:N`` (for contexts above N: a real prefill of N
tokens tiled to the context, keys re-rotated, see :mod:`.synthetic`). A context runs once with every kind that
covers it, so ``real:8192,synthetic:4096`` times 8K both ways side by side.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import A2atsError
from .memory import dense_kv_bytes
from .synthetic import length_dependent_rope

REAL, SYNTHETIC = "real", "synthetic"


@dataclass(frozen=True)
class CacheKind:
    """``real`` with an optional longest context ``tokens``, or ``synthetic`` tiled from ``tokens`` real ones."""

    kind: str
    tokens: int | None = None

    def covers(self, context: int) -> bool:
        if self.kind == SYNTHETIC:
            return context > self.tokens
        return self.tokens is None or context <= self.tokens

    def __str__(self) -> str:
        return self.kind if self.tokens is None else f"{self.kind}:{self.tokens}"


def parse_cache_kinds(spec: str) -> list[CacheKind]:
    """``"real"``, ``"synthetic:4096"``, ``"real:8k,synthetic:4k"`` -> cache kinds (k = 1024 tokens)."""
    from ..evaluation.options import parse_int_list

    kinds = []
    for part in (p.strip().lower() for p in spec.split(",") if p.strip()):
        name, _, tokens = part.partition(":")
        if name not in (REAL, SYNTHETIC) or (name == SYNTHETIC and not tokens):
            raise A2atsError(f"--cache takes real, real:MAX or synthetic:N (comma-separated), got {part!r}")
        kinds.append(CacheKind(name, parse_int_list(tokens, "--cache")[0] if tokens else None))
    if not kinds:
        raise A2atsError("--cache is empty")
    return kinds


@dataclass(frozen=True)
class Point:
    context: int
    batch: int
    cache: CacheKind


def plan_points(
    model: Any, contexts: Sequence[int], batches: Sequence[int], kinds: Sequence[CacheKind], *,
    decode_tokens: int, caches: int, element_size: int, memory_limit: float | None,
) -> tuple[list[Point], list[str]]:
    """The points to run, in (context, batch, kind) order, and notes on the ones left out or past the model's
    positions. ``caches``: how many full caches a point holds at once (one per contender); ``memory_limit`` (GiB):
    leave out points whose caches together would take more."""
    from ..models import text_config

    notes: list[str] = []
    uncovered = [c for c in contexts if not any(k.covers(c) for k in kinds)]
    if uncovered:
        raise A2atsError(f"no --cache kind covers contexts {uncovered} (synthetic:N covers contexts above N); "
                         "add real or real:MAX")
    max_len = int(getattr(text_config(model), "max_position_embeddings", 0) or 0)
    beyond = sorted({c for c in contexts if max_len and c + decode_tokens > max_len})
    rope = length_dependent_rope(model)
    if beyond and rope:
        notes.append(f"contexts {beyond} skipped: with their {decode_tokens} decode steps they pass the model's "
                     f"{max_len} positions, where its {rope} rotary embedding switches frequencies")
    elif beyond:
        notes.append(f"contexts {beyond} with their {decode_tokens} decode steps pass the model's {max_len} positions: "
                     f"timed anyway (a step's cost does not depend on it); quality holds only up to {max_len}")
    points, heavy = [], []
    for context in sorted(set(contexts)):
        if rope and context in beyond:
            continue
        for batch in batches:
            need = caches * dense_kv_bytes(model, batch, context + decode_tokens, element_size)
            if memory_limit is not None and need > memory_limit * 2**30:
                heavy.append(f"{context}×{batch} ({need / 2**30:.1f} GiB)")
                continue
            points += [Point(context, batch, k) for k in kinds if k.covers(context)]
    if heavy:
        notes.append(f"points (context×batch) skipped by --memory-limit {memory_limit:g} GiB, their caches "
                     f"together: {', '.join(heavy)}")
    return points, notes
