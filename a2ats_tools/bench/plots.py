"""PNG plots of bench results against context length (log axis), one line per contender and batch size:
throughput, and step latency with the floor (dense at a short context) as a horizontal line per batch.

Where a context was timed with both a real and a synthetic cache, the line runs through the real point and the
synthetic one is a hollow marker beside it; points from synthetic caches are hollow markers throughout.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..io import atomic_path

STYLES = ["-", "--", ":", "-."]
MARKERS = ["o", "s", "^", "D", "v", "P"]


def line_points(points: list[dict[str, Any]], batch: int) -> list[dict[str, Any]]:
    """One point per context at ``batch`` (the real-cache one where both kinds ran), by context."""
    chosen: dict[int, dict[str, Any]] = {}
    for p in points:
        if p["batch"] != batch:
            continue
        have = chosen.get(p["context"])
        if have is None or (have.get("cache", "real") != "real" and p.get("cache", "real") == "real"):
            chosen[p["context"]] = p
    return [chosen[c] for c in sorted(chosen)]


def _plot(points: list[dict[str, Any]], path: Path, value: Callable[[dict], float], ylabel: str, title: str,
          floor: bool = False) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    batches = sorted({p["batch"] for p in points})
    names = list(points[0]["contenders"]) if points else []
    for bi, batch in enumerate(batches):
        rows = line_points(points, batch)
        for ni, name in enumerate(names):
            xs = [p["context"] for p in rows]
            ys = [value(p["contenders"][name]) for p in rows]
            style, marker = STYLES[ni % len(STYLES)], MARKERS[ni % len(MARKERS)]
            ax.plot(xs, ys, linestyle=style, marker=marker, color=f"C{bi}", label=f"{name}, batch {batch}",
                    markevery=[i for i, p in enumerate(rows) if p.get("cache", "real") == "real"])
            hollow = [p for p in points if p["batch"] == batch and p.get("cache", "real") != "real"]
            ax.plot([p["context"] for p in hollow], [value(p["contenders"][name]) for p in hollow],
                    linestyle="none", marker=marker, fillstyle="none", color=f"C{bi}")
        floors = [value(p["floor"]) for p in rows if floor and p.get("floor")]  # the line's points' floors
        if floors:
            ax.axhline(statistics.median(floors), color=f"C{bi}", alpha=0.5, linewidth=1,
                       label=f"floor ({points[0]['floor']['context']} tokens), batch {batch}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    if points:
        ctx = sorted({p["context"] for p in points})
        ax.set_xticks(ctx, [f"{c // 1024}K" if c % 1024 == 0 else str(c) for c in ctx])
    ax.set_xlabel("context length (tokens); hollow markers: synthetic caches")
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path


def plot_throughput(points: list[dict[str, Any]], path: Path, title: str = "") -> Path:
    return _plot(points, path, lambda c: c["tokens_per_s"]["median"], "decode throughput (tokens/s, median)", title)


def plot_latency(points: list[dict[str, Any]], path: Path, title: str = "") -> Path:
    return _plot(points, path, lambda c: 1e3 * c["step_latency_s"]["median"], "decode step (ms, median)", title,
                 floor=True)
