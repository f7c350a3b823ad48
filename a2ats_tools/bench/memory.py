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
