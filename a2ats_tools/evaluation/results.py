"""The eval results document (``results.json``) and its terminal tables."""

from __future__ import annotations

import platform
import time
from pathlib import Path
from typing import Any

from rich.markup import escape
from rich.table import Table

from .. import __version__
from ..io import write_json
from ..provenance import run_provenance
from ..reporting import Reporter

SCHEMA = "a2ats.eval"


def new_results(checkpoint: str, model: str, settings: dict[str, Any]) -> dict[str, Any]:
    return {
        "schema": SCHEMA,
        "tool_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "host": platform.node(),
        "checkpoint": checkpoint,
        "model": model,
        "provenance": run_provenance(),
        "settings": settings,
        "recall": None,
        "tasks": None,
        "perplexity": None,
    }


def write_results(out: Path, results: dict[str, Any]) -> Path:
    path = out / "results.json"
    write_json(path, results)
    return path


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def recall_table(recall: dict[str, Any]) -> Table:
    table = Table(title="Held-out attention-mass recall % (top-K recall %), mean over layers")
    table.add_column("method")
    for b in recall["budgets"]:
        table.add_column(f"budget {b}", justify="right")
    for method in recall["methods"]:
        row = [escape(method)]
        for b in recall["budgets"]:
            cell = recall["overall"].get(method, {}).get(b, {})
            row.append(f"{_pct(cell.get('mass'))} ({_pct(cell.get('topk'))})")
        table.add_row(*row)
    return table


def _task_grid(title: str, configs: list[str]) -> Table:
    """An empty table with a task and a length column, then one column per configuration."""
    table = Table(title=title)
    table.add_column("task")
    table.add_column("length", justify="right")
    for c in configs:
        table.add_column(escape(c), justify="right")  # labels such as a2ats[rerank=4] are not markup
    return table


def task_table(tasks: dict[str, Any]) -> Table:
    """Rows: task × length; columns: dense and each retrieval configuration (mean exact-match score %)."""
    configs = tasks["configs"]
    table = _task_grid("Long-context tasks: exact-match score % (samples per cell in brackets)", configs)
    for row in tasks["rows"]:
        cells = [row["task"], str(row["length"])]
        for c in configs:
            s = row["scores"].get(c)
            cells.append("-" if s is None else f"{100 * s['mean']:.0f} [{s['n']}]")
        table.add_row(*cells)
    return table


def same_output_table(tasks: dict[str, Any]) -> Table | None:
    """Rows: task × length; columns: each retrieval configuration (samples whose greedy output is dense's,
    token for token); None when no row has dense beside a configuration."""
    configs = [c for c in tasks["configs"] if c != "dense"]
    rows = [row for row in tasks["rows"] if row.get("same_as_dense")]
    if not configs or not rows:
        return None
    table = _task_grid("Greedy outputs identical to dense's (samples)", configs)
    for row in rows:
        n = row["scores"]["dense"]["n"]
        cells = [row["task"], str(row["length"])]
        cells += [f"{row['same_as_dense'][c]}/{n}" if c in row["same_as_dense"] else "-" for c in configs]
        table.add_row(*cells)
    return table


def perplexity_table(ppl: dict[str, Any]) -> Table:
    texts = ppl.get("texts", 1)
    where = f"{texts} texts" if texts > 1 else "one text"
    table = Table(title=f"Decode-mode perplexity over the last {ppl['n_decode']} of {ppl['length']} tokens ({where})")
    table.add_column("configuration")
    table.add_column("perplexity", justify="right")
    table.add_column("vs dense", justify="right")
    if texts > 1:
        table.add_column("vs dense per text (min–max)", justify="right")
    dense = ppl["configs"].get("dense", {})
    for name, cell in ppl["configs"].items():
        p = cell["perplexity"]
        row = [escape(name), f"{p:.3f}", f"{p / dense['perplexity']:.3f}×" if dense else "-"]
        if texts > 1:
            ratios = [a / b for a, b in zip(cell.get("per_text", []), dense.get("per_text", []), strict=False)]
            row.append(f"{min(ratios):.3f}–{max(ratios):.3f}×" if ratios else "-")
        table.add_row(*row)
    return table


def show_results(results: dict[str, Any], reporter: Reporter) -> None:
    """A table per stage that ran, then the notes."""
    if results.get("recall"):
        reporter.table(recall_table(results["recall"]))
    if results.get("tasks"):
        reporter.table(task_table(results["tasks"]))
        same = same_output_table(results["tasks"])
        if same is not None:
            reporter.table(same)
    if results.get("perplexity"):
        reporter.table(perplexity_table(results["perplexity"]))
    for note in results.get("notes", []):
        reporter.note(note)
