"""Decode timing: prefill once per contender, then alternate blocks of timed decode steps between contenders
in the same process, so drift (thermal, other load) hits both alike. Ratios are taken per block pair."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .memory import cache_device_bytes, current_process_bytes, device_peak_bytes, reset_device_peak


@dataclass
class Contender:
    """A way to run the model: ``prepare()`` switches attention, ``make_cache()`` gives a fresh KV cache."""

    name: str
    prepare: Callable[[], None]
    make_cache: Callable[[], Any]


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
    warmup: int = 2,
    tick: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """One (context, batch) grid point: prefill time, per-step latency and tokens/s per contender, memory, and
    per-repeat ratios of each contender's throughput to the first's (the dense reference)."""
    device = input_ids.device
    batch, context = input_ids.shape
    states: dict[str, dict[str, Any]] = {}
    for c in contenders:
        c.prepare()
        reset_device_peak(device)
        cache = c.make_cache()
        _sync(device)
        t0 = time.perf_counter()
        out = model(input_ids=input_ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        _sync(device)
        prefill_s = time.perf_counter() - t0
        states[c.name] = {
            "cache": out.past_key_values, "next": out.logits[:, -1].argmax(-1, keepdim=True), "pos": context,
            "prefill_s": prefill_s, "blocks": [], "kv_device_bytes": cache_device_bytes(out.past_key_values, device),
        }
        del out
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
                    input_ids=st["next"], past_key_values=st["cache"], use_cache=True,
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
            "prefill_s": st["prefill_s"],
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
