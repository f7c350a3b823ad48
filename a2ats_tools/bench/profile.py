"""Where a decode step goes: torch.profiler CPU time of a few steps, each microsecond counted once (in the
innermost op or range it ran in), grouped.

The model's attention function (``a2ats``, ``sdpa``) runs inside a ``bench::attention`` range and the fused CPU
kernel (a ctypes call, which the profiler does not see as an op) inside ``bench::fused_kernel``, both only while
profiling. Time in no op at all is Python and framework overhead. The profiler adds its own overhead per op, so
the groups are shares, not step times.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

ATTENTION, KERNEL = "bench::attention", "bench::fused_kernel"
LINEAR = ("aten::linear", "aten::addmm", "aten::mm", "aten::matmul")
GATHER = ("aten::index", "aten::gather", "aten::index_select", "aten::take_along_dim", "aten::topk", "aten::sort",
          "aten::take", "aten::index_put_", "aten::scatter_")
BOOKKEEPING = ("aten::copy_", "aten::cat", "aten::empty", "aten::zeros", "aten::ones", "aten::full", "aten::arange",
               "aten::to", "aten::_to_copy", "aten::clone", "aten::fill_", "aten::slice", "aten::select",
               "aten::narrow", "aten::view", "aten::expand", "aten::as_strided", "aten::unsqueeze", "aten::reshape",
               "aten::where", "aten::eq", "aten::ne", "aten::ge", "aten::gt", "aten::le", "aten::lt",
               "aten::logical_and", "aten::logical_or", "aten::bitwise_and", "aten::bitwise_or", "aten::item",
               "aten::_local_scalar_dense", "aten::contiguous", "aten::empty_strided", "aten::resize_")
G_LINEAR, G_KERNEL, G_GATHER, G_ATTN_OPS, G_ATTN_PY, G_BOOK, G_OTHER, G_PYTHON = GROUPS = (
    "linear layers", "fused CPU kernel", "attention: gathers and top-K",
    "attention: other ops (SDPA, torch-path scoring)",
    "attention: Python", "cache and mask bookkeeping", "other ops (norms, activations, rotary)",
    "Python and framework (no op)",
)


def _group(name: str, in_attention: bool) -> str:
    if name == KERNEL:
        return G_KERNEL
    if name == ATTENTION:
        return G_ATTN_PY
    if in_attention:
        return G_GATHER if name in GATHER else G_ATTN_OPS
    if name in LINEAR:
        return G_LINEAR
    return G_BOOK if name in BOOKKEEPING or name in GATHER else G_OTHER


def _inside(event: Any, name: str) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name == name:
            return True
        parent = parent.cpu_parent
    return False


@contextlib.contextmanager
def _ranges(attention_name: str | None) -> Iterator[None]:
    """Wrap the attention function and the fused kernel in profiler ranges for the duration."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from ..kernels import cpu_decode

    def ranged(label: str, fn: Callable) -> Callable:
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            with torch.profiler.record_function(label):
                return fn(*args, **kwargs)

        return wrapper

    undo: list[Callable[[], None]] = []
    if attention_name and attention_name in ALL_ATTENTION_FUNCTIONS:
        had_local = attention_name in ALL_ATTENTION_FUNCTIONS._local_mapping
        original = ALL_ATTENTION_FUNCTIONS[attention_name]
        ALL_ATTENTION_FUNCTIONS[attention_name] = ranged(ATTENTION, original)
        undo.append(lambda: ALL_ATTENTION_FUNCTIONS.__setitem__(attention_name, original) if had_local
                    else ALL_ATTENTION_FUNCTIONS.__delitem__(attention_name))
    kernel = getattr(cpu_decode, "decode_layer", None)
    if kernel is not None:
        cpu_decode.decode_layer = ranged(KERNEL, kernel)
        undo.append(lambda: setattr(cpu_decode, "decode_layer", kernel))
    try:
        yield
    finally:
        for fn in reversed(undo):
            fn()


def profile_steps(step: Callable[[], None], steps: int, attention_name: str | None) -> dict[str, Any]:
    """Run ``step()`` ``steps`` times under the profiler: ``{"wall_s_per_step", "groups": {group: seconds per
    step}, "top_ops": [[name, seconds per step], ...]}`` (the ten ops with the most self time)."""
    from torch.profiler import ProfilerActivity, profile

    with _ranges(attention_name), profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        wall = time.perf_counter() - t0
    groups = dict.fromkeys(GROUPS, 0.0)
    per_op: dict[str, float] = {}
    for ev in prof.events():
        if ev.device_type != torch.autograd.DeviceType.CPU:
            continue
        seconds = ev.self_cpu_time_total / 1e6
        groups[_group(ev.name, _inside(ev, ATTENTION))] += seconds
        per_op[ev.name] = per_op.get(ev.name, 0.0) + seconds
    groups[G_PYTHON] = max(0.0, wall - sum(groups.values()))
    top = sorted(per_op.items(), key=lambda kv: -kv[1])[:10]
    return {"wall_s_per_step": wall / steps, "groups": {k: v / steps for k, v in groups.items()},
            "top_ops": [[name, s / steps] for name, s in top]}
