"""Memory figures: KV bytes resident on the compute device, and peak process / device memory."""

from __future__ import annotations

import resource
import sys
from typing import Any

import torch


def cache_device_bytes(cache: Any, device: torch.device) -> int:
    """Bytes of a KV cache held on ``device`` (A²ATS caches report it themselves, with selector metadata)."""
    if hasattr(cache, "device_bytes"):
        return int(cache.device_bytes())
    total = 0
    for layer in getattr(cache, "layers", []):
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor) and t.device.type == device.type:
                total += t.numel() * t.element_size()
    return total


def peak_process_bytes() -> int:
    """Peak resident set size of this process so far (monotone over the process lifetime)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def reset_peak_rss() -> bool:
    """Start a new peak-RSS interval (Linux: ``/proc/self/clear_refs`` 5 resets ``VmHWM``); False where the peak
    cannot be reset, so :func:`peak_rss_bytes` stays the process's peak so far."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """Peak resident set size since the last :func:`reset_peak_rss` (``VmHWM``), else since the process began."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return peak_process_bytes()


def dense_kv_bytes(model: Any, batch: int, context: int, element_size: int) -> int:
    """Bytes of a dense cache of ``context`` tokens: every full-attention layer holds them all, a windowed layer
    its window."""
    from ..models import attention_window, geometry, layer_types

    geo = geometry(model)
    rows = 0
    for kind in layer_types(model):
        window = attention_window(model, kind)
        rows += context if window is None else min(context, window)
    return 2 * batch * geo.num_kv_heads * geo.head_dim * element_size * rows


def current_process_bytes() -> int:
    """Current resident set size (Linux /proc; falls back to the peak elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        import os

        return pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return peak_process_bytes()


def reset_device_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def device_peak_bytes(device: torch.device) -> int | None:
    return int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None
