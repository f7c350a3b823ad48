"""PNG plots of eval results: recall vs budget, task score vs context length."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..io import atomic_path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _budget_value(b: str) -> float:
    return float(b)


def plot_recall(recall: dict[str, Any], path: Path, metric: str = "mass") -> Path:
    """Recall (mean over layers) vs budget, one line per method."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [_budget_value(b) for b in recall["budgets"]]
    fractions = all(x <= 1.0 for x in xs)
    for method in recall["methods"]:
        ys = [recall["overall"][method][b][metric] for b in recall["budgets"]]
        ax.plot([100 * x if fractions else x for x in xs], ys, marker="o", label=method)
    ax.set_xlabel("budget (% of context)" if fractions else "budget (tokens)")
    ax.set_ylabel("attention-mass recall" if metric == "mass" else "top-K recall")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path


def plot_tasks(tasks: dict[str, Any], path: Path) -> Path:
    """Mean task score vs context length (averaged over tasks), one line per configuration."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    lengths = sorted({row["length"] for row in tasks["rows"]})
    for config in tasks["configs"]:
        ys = []
        for length in lengths:
            cells = [r["scores"][config]["mean"] for r in tasks["rows"] if r["length"] == length and config in r["scores"]]
            ys.append(sum(cells) / len(cells) if cells else float("nan"))
        ax.plot(lengths, ys, marker="o", label=config)
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths, [str(n) for n in lengths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("exact-match score (mean over tasks)")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path
