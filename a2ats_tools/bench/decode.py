"""Decode timing: one dense prefill shared by every contender (retrieval caches are filled from it, each key
encoded once, as their own prefill would), then alternating blocks of timed decode steps between contenders in
the same process, so drift (thermal, other load) hits all alike. Ratios are taken per block pair."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..compat import cache_kwargs
from .memory import cache_device_bytes, current_process_bytes, device_peak_bytes, reset_device_peak


@dataclass
class Contender:
    """A way to run the model: ``prepare()`` switches attention, ``make_cache()`` gives a fresh KV cache and
    ``from_prefix(dense_cache)`` a cache holding a dense prefill (None: the contender is the dense reference)."""

    name: str
    prepare: Callable[[], None]
    make_cache: Callable[[], Any]
    from_prefix: Callable[[Any], Any] | None = None


WARMUP_STEPS = 2  # untimed decode steps per contender before the timed blocks


def prefill_tokens_per_chunk(batch: int) -> int:
    """Prefill chunk so a chunk's attention scores stay about 1 GiB per 8K of context (``batch * chunk <= 4096``)."""
    return max(128, 4096 // max(1, batch))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def stats(values: Sequence[float]) -> dict[str, float]:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


@torch.no_grad()
def bench_point(
    model: Any,
    contenders: Sequence[Contender],
    input_ids: torch.Tensor,
    *,
    steps: int,
    repeats: int,
    warmup: int = WARMUP_STEPS,
    tick: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """One (context, batch) grid point: prefill time, per-step latency and tokens/s per contender, memory, and
    per-repeat ratios of each contender's throughput to the first's (the dense reference)."""
    device = input_ids.device
    batch, context = input_ids.shape
    ref = contenders[0]
    if ref.from_prefix is not None or any(c.from_prefix is None for c in contenders[1:]):
        raise ValueError("the first contender is the dense reference; the others fill their caches from its prefill")
    ref.prepare()
    reset_device_peak(device)
    cache = ref.make_cache()
    chunk = prefill_tokens_per_chunk(batch)
    _sync(device)
    t0 = time.perf_counter()
    for start in range(0, context, chunk):
        out = model(input_ids=input_ids[:, start : start + chunk], **cache_kwargs(cache), use_cache=True, logits_to_keep=1)
    _sync(device)
    prefill_s = time.perf_counter() - t0
    first = out.logits[:, -1].argmax(-1, keepdim=True)
    del out
    states: dict[str, dict[str, Any]] = {
        ref.name: {"cache": cache, "next": first, "pos": context, "prefill_s": prefill_s, "fill_s": 0.0,
                   "blocks": [], "kv_device_bytes": cache_device_bytes(cache, device)},
    }
    if tick is not None:
        tick()
    for c in contenders[1:]:
        c.prepare()
        _sync(device)
        t0 = time.perf_counter()
        own = c.from_prefix(cache)
        _sync(device)
        fill_s = time.perf_counter() - t0
        states[c.name] = {"cache": own, "next": first.clone(), "pos": context, "prefill_s": prefill_s + fill_s,
                          "fill_s": fill_s, "blocks": [], "kv_device_bytes": cache_device_bytes(own, device)}
        if tick is not None:
            tick()
    for rep in range(repeats + 1):  # block 0 is warm-up, not recorded
        for c in contenders:
            c.prepare()
            st = states[c.name]
            times = []
            n = warmup if rep == 0 else steps
            for _ in range(n):
                _sync(device)
                t0 = time.perf_counter()
                out = model(
                    input_ids=st["next"], **cache_kwargs(st["cache"]), use_cache=True,
                    cache_position=torch.tensor([st["pos"]], device=device),
                )
                st["next"] = out.logits[:, -1].argmax(-1, keepdim=True)
                _sync(device)
                times.append(time.perf_counter() - t0)
                st["pos"] += 1
            if rep > 0:
                st["blocks"].append(statistics.median(times))
            if tick is not None and rep > 0:
                tick()
    result: dict[str, Any] = {"context": context, "batch": batch, "steps": steps, "repeats": repeats, "contenders": {}}
    ref = contenders[0].name
    for c in contenders:
        st = states[c.name]
        latency = st["blocks"]
        result["contenders"][c.name] = {
            "prefill_s": st["prefill_s"],  # retrieval contenders: the shared dense prefill + their cache fill
            "cache_fill_s": st["fill_s"],
            "step_latency_s": stats(latency),
            "tokens_per_s": stats([batch / t for t in latency]),
            "kv_device_bytes": st["kv_device_bytes"],
            "device_peak_bytes": device_peak_bytes(device),
            "process_bytes_after": current_process_bytes(),
        }
        if c.name != ref:
            ratios = [r / t for r, t in zip(states[ref]["blocks"], latency, strict=True)]
            result["contenders"][c.name]["speedup_vs_" + ref] = stats(ratios)
    for st in states.values():
        st["cache"] = None
    return result
