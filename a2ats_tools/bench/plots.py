"""PNG plot of bench results: decode throughput vs context length, one line per contender and batch size."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..io import atomic_path


def plot_throughput(points: list[dict[str, Any]], path: Path, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    batches = sorted({p["batch"] for p in points})
    names = list(points[0]["contenders"]) if points else []
    styles = ["-", "--", ":", "-."]
    for bi, batch in enumerate(batches):
        rows = sorted((p for p in points if p["batch"] == batch), key=lambda p: p["context"])
        for ni, name in enumerate(names):
            xs = [p["context"] for p in rows]
            ys = [p["contenders"][name]["tokens_per_s"]["median"] for p in rows]
            ax.plot(xs, ys, marker="o", linestyle=styles[ni % len(styles)], color=f"C{bi}", label=f"{name}, batch {batch}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    if points:
        ctx = sorted({p["context"] for p in points})
        ax.set_xticks(ctx, [str(c) for c in ctx])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("decode throughput (tokens/s, median)")
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path
