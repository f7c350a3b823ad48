"""Decode timing: one dense cache shared by every contender (retrieval caches are filled from it, each key
encoded once, as their own prefill would), then alternating blocks of timed decode steps between contenders in
the same process, so drift (thermal, other load) hits all alike. Ratios are taken per block pair.

Beside the contenders runs the *floor*: the dense model decoding from a short context (512 tokens), where
attention costs almost nothing, timed in the same alternation; every step is also reported as a multiple of it.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..compat import cache_kwargs
from .memory import cache_device_bytes, current_process_bytes, device_peak_bytes
from .prefill import REAL, Prefilled, sync

FLOOR = "floor"


@dataclass
class Contender:
    """A way to run the model: ``prepare()`` switches attention, ``make_cache()`` gives a fresh KV cache and
    ``from_prefix(dense_cache)`` a cache holding a dense prefill (None: the contender is the dense reference)."""

    name: str
    prepare: Callable[[], None]
    make_cache: Callable[[], Any]
    from_prefix: Callable[[Any], Any] | None = None


@dataclass(frozen=True)
class Timing:
    """How one grid point is timed: ``repeats`` blocks of ``steps`` decode steps per runner after a warm-up block
    of ``warmup`` steps; ``generate``: as many rounds of ``steps`` steps through ``model.generate``; ``profile``:
    ``steps`` profiled steps per runner."""

    steps: int
    repeats: int
    warmup: int = 2
    generate: bool = False
    profile: bool = False

    def decode_tokens(self) -> int:
        """Tokens a runner's cache grows by at one point (its final length is known up front: caches reserve it)."""
        gen = self.repeats * (self.steps + 1) if self.generate else 0
        return self.warmup + self.repeats * self.steps + gen + (self.steps if self.profile else 0) + 2


WARMUP_STEPS = Timing(1, 1).warmup  # untimed decode steps per contender before the timed blocks


@dataclass
class Run:
    """One runner's decode state: its cache, the prompt and the tokens fed since, the next token, its blocks."""

    name: str
    prepare: Callable[[], None]
    cache: Any
    ids: torch.Tensor
    next: torch.Tensor
    pos: int
    fill_s: float = 0.0
    kv_device_bytes: int = 0
    fed: list[torch.Tensor] = field(default_factory=list)
    blocks: list[float] = field(default_factory=list)
    generate_blocks: list[float] = field(default_factory=list)
    profile: dict[str, Any] | None = None
    traffic: list[tuple[int, int]] = field(default_factory=list)  # per timed step: K/V store (read, write) bytes

    def step(self, model: Any) -> float:
        """One timed greedy decode step."""
        device = self.next.device
        sync(device)
        t0 = time.perf_counter()
        out = model(input_ids=self.next, **cache_kwargs(self.cache), use_cache=True,
                    cache_position=torch.tensor([self.pos], device=device))
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        sync(device)
        seconds = time.perf_counter() - t0
        self.fed.append(self.next)
        self.next, self.pos = token, self.pos + 1
        return seconds


def stats(values: Sequence[float]) -> dict[str, float]:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def _ratios(num: Sequence[float], den: Sequence[float]) -> dict[str, float]:
    return stats([a / b for a, b in zip(num, den, strict=True)])


def _runs(contenders: Sequence[Contender], start: Prefilled, floor: Prefilled | None, tick) -> list[Run]:
    """The reference takes ``start``'s cache; every other contender fills its own from it (timed); the floor
    runs the reference's attention on ``floor``'s cache."""
    ref = contenders[0]
    if ref.from_prefix is not None or any(c.from_prefix is None for c in contenders[1:]):
        raise ValueError("the first contender is the dense reference; the others fill their caches from its prefill")
    device = start.ids.device
    runs = [Run(ref.name, ref.prepare, start.cache, start.ids, start.first, start.context,
                kv_device_bytes=cache_device_bytes(start.cache, device))]
    if tick is not None:
        tick()
    for c in contenders[1:]:
        c.prepare()
        sync(device)
        t0 = time.perf_counter()
        own = c.from_prefix(start.cache)
        sync(device)
        runs.append(Run(c.name, c.prepare, own, start.ids, start.first.clone(), start.context,
                        fill_s=time.perf_counter() - t0, kv_device_bytes=cache_device_bytes(own, device)))
        if tick is not None:
            tick()
    if floor is not None:
        runs.append(Run(FLOOR, ref.prepare, floor.cache, floor.ids, floor.first, floor.context,
                        kv_device_bytes=cache_device_bytes(floor.cache, device)))
    return runs


def _blocks(model: Any, runs: Sequence[Run], timing: Timing, tick) -> None:
    for rep in range(timing.repeats + 1):  # block 0 is warm-up, not recorded
        for run in runs:
            run.prepare()
            before = _store_traffic(run.cache)
            count = timing.warmup if rep == 0 else timing.steps
            times = [run.step(model) for _ in range(count)]
            if rep > 0:
                run.blocks.append(statistics.median(times))
                after = _store_traffic(run.cache)
                if before is not None and after is not None and count:
                    run.traffic.append(((after[0] - before[0]) // count, (after[1] - before[1]) // count))
                if tick is not None and run.name != FLOOR:
                    tick()


def _store_traffic(cache: Any) -> tuple[int, int] | None:
    """The A²ATS cache's K/V store ``(read, written)`` bytes so far (:meth:`A2atsCache.store_traffic`); None for
    a dense cache, which reads all of itself every step."""
    return cache.store_traffic() if hasattr(cache, "store_traffic") else None


def _generate_rounds(model: Any, runs: Sequence[Run], timing: Timing, pad_token_id: int | None) -> None:
    """``repeats`` alternating rounds of ``generate`` per runner, continuing from where its cache stands."""
    from .through_generate import generate_steps

    for _ in range(timing.repeats):
        for run in runs:
            run.prepare()
            ids = torch.cat([run.ids, *run.fed, run.next], 1)
            times, new = generate_steps(model, run.cache, ids, timing.steps, pad_token_id)
            run.generate_blocks.append(statistics.median(times))
            run.fed.append(torch.cat([run.next, new[:, :-1]], 1))
            run.next, run.pos = new[:, -1:], run.pos + new.shape[1]


def _profile(model: Any, runs: Sequence[Run], timing: Timing) -> None:
    from .profile import profile_steps

    for run in runs:
        if run.name == FLOOR:
            continue
        run.prepare()
        attention = getattr(model.config, "_attn_implementation", None)
        run.profile = profile_steps(lambda run=run: run.step(model), timing.steps, attention)


@torch.no_grad()
def bench_point(
    model: Any,
    contenders: Sequence[Contender],
    start: Prefilled,
    timing: Timing,
    *,
    floor: Prefilled | None = None,
    pad_token_id: int | None = None,
    tick: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """One (context, batch, cache) grid point from ``start`` (the reference's cache, which it decodes in): per
    contender the step latency, tokens/s, cache fill, memory and per-block ratios to the reference and to the
    ``floor`` (a short dense context decoded alongside). ``device_peak_bytes`` is the CUDA peak since the caller
    last reset it (:func:`.memory.reset_device_peak`, before building ``start``)."""
    runs = _runs(contenders, start, floor, tick)
    _blocks(model, runs, timing, tick)
    if timing.generate:
        _generate_rounds(model, runs, timing, pad_token_id)
    if timing.profile:
        _profile(model, runs, timing)
    result = _summary(runs, start, timing)
    for run in runs:
        run.cache = None
    return result


def _timings(blocks: Callable[[Run], list[float]], run: Run, ref: Run, floor: Run | None) -> dict[str, Any]:
    """Step latency over ``blocks(run)`` and its per-block ratios to the reference's and the floor's blocks."""
    out: dict[str, Any] = {"step_latency_s": stats(blocks(run))}
    if run is not ref:
        out["speedup_vs_" + ref.name] = _ratios(blocks(ref), blocks(run))
    if floor is not None:
        out["vs_floor"] = _ratios(blocks(run), blocks(floor))
    return out


def _summary(runs: Sequence[Run], start: Prefilled, timing: Timing) -> dict[str, Any]:
    floor = runs[-1] if runs[-1].name == FLOOR else None
    ref = runs[0]
    batch, device = start.ids.shape[0], start.ids.device
    result: dict[str, Any] = {
        "context": start.context, "batch": batch, "cache": start.kind, "source_tokens": start.source_tokens,
        "steps": timing.steps, "repeats": timing.repeats, "cache_build_s": start.seconds, "contenders": {},
        "floor": None if floor is None else {"context": floor.ids.shape[1],
                                             **_timings(lambda r: r.blocks, floor, floor, None)},
    }
    for run in runs:
        if run is floor:
            continue
        entry = {
            "prefill_s": start.seconds + run.fill_s,  # retrieval contenders: the shared dense cache + their fill
            "cache_fill_s": run.fill_s,
            # the encode's share of a real prefill (a synthetic cache's build time is no prefill time)
            "cache_fill_share": (run.fill_s / (start.seconds + run.fill_s)
                                 if start.kind == REAL and run.fill_s else None),
            **_timings(lambda r: r.blocks, run, ref, floor),
            "tokens_per_s": stats([batch / t for t in run.blocks]),
            "kv_device_bytes": run.kv_device_bytes,
            # per decode step, A²ATS caches only: bytes of K/V rows read from the store and appended to it
            "kv_read_bytes_per_step": max(r for r, _ in run.traffic) if run.traffic else None,
            "kv_write_bytes_per_step": max(w for _, w in run.traffic) if run.traffic else None,
            "device_peak_bytes": device_peak_bytes(device),
            "process_bytes_after": current_process_bytes(),
        }
        if run.generate_blocks:
            entry["generate"] = _timings(lambda r: r.generate_blocks, run, ref, floor)
        if run.profile is not None:
            entry["profile"] = run.profile
        result["contenders"][run.name] = entry
    if floor is not None and floor.generate_blocks:
        result["floor"]["generate"] = _timings(lambda r: r.generate_blocks, floor, floor, None)
    return result
