"""Render docs/results.md, its figures and the README's results table from the JSON that `a2ats eval`
(results.json) and `a2ats bench` (bench.json) write.

    python benchmarks/report.py runs/grid                    # a run_grid.py output: eval-*/ and bench/
    python benchmarks/report.py runs/eval runs/bench-8k      # any eval or bench output directories or JSON files

Every table is captioned with its run's command, commit, machine, versions and date (the ``provenance`` record
of the JSON). A section whose JSON is absent is left out. The page is generated: edit this script, not the page.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS_MD = ROOT / "docs" / "results.md"
FIGURES = ROOT / "docs" / "figures"
README = ROOT / "README.md"
SUMMARY_BEGIN = "<!-- BEGIN RESULTS SUMMARY (benchmarks/report.py) -->"
SUMMARY_END = "<!-- END RESULTS SUMMARY -->"
KNOWN_PNGS = {"recall.png", "recall_topk.png", "tasks.png", "throughput.png"}  # re-plotted from the JSON here


@dataclass(frozen=True)
class Run:
    """One results document: ``kind`` is "eval" or "bench"; ``model``: the model it measured."""

    kind: str
    path: Path
    data: dict[str, Any]
    model: str


def load_runs(sources: Iterable[Path]) -> list[Run]:
    """The eval and bench documents among ``sources``: JSON files, or directories holding results.json /
    bench.json themselves or one level down (a grid's eval-*/ and bench/)."""
    import json

    files: list[Path] = []
    for src in sources:
        if src.is_file():
            files.append(src)
        elif src.is_dir():
            for where in (src, *sorted(p for p in src.iterdir() if p.is_dir())):
                files += [where / n for n in ("results.json", "bench.json", "bench-vllm.json") if (where / n).is_file()]
        else:
            raise SystemExit(f"report: {src} does not exist")
    runs = []
    for f in files:
        data = json.loads(f.read_text())
        kind = {"a2ats.eval": "eval", "a2ats.bench": "bench", "a2ats.vllm-bench": "vllm"}.get(data.get("schema", ""))
        if kind is None:
            kind = "bench" if "points" in data else "eval"
        runs.append(Run(kind, f, data, _measured_model(data)))
    return runs


# --- captions ---------------------------------------------------------------------------------------------

def provenance(data: dict[str, Any]) -> dict[str, Any]:
    """The run's provenance record, with the top-level ``created`` / ``host`` of older documents as fallback."""
    return {"created": data.get("created"), "host": data.get("host"), **(data.get("provenance") or {})}


def caption(run: Run) -> str:
    """One line naming the command, commit, machine, versions and date of ``run``."""
    p = provenance(run.data)
    parts = [f"`{p['command']}`" if p.get("command") else "command not recorded"]
    commit = p.get("commit")
    parts.append(f"commit `{commit[:7]}{'+dirty' if commit.endswith('+dirty') else ''}`" if commit
                 else "commit not recorded")
    if p.get("cpu"):
        parts.append(f"{p['cpu']}, {p.get('cores')} cores" + (f" (host {p['host']})" if p.get("host") else ""))
    else:
        parts.append(f"host {p.get('host') or '?'}, CPU not recorded")
    if p.get("load"):
        parts.append(f"load average {p['load'][0]:.1f} (1 min) when written")
    if "torch_threads" in run.data:
        parts.append(f"{run.data['torch_threads']} torch threads")
    versions = [f"{name} {p[name]}" for name in ("torch", "transformers") if p.get(name)]
    parts.append(", ".join(versions) if versions else "versions not recorded")
    parts.append((p.get("created") or "date not recorded")[:10])
    return "Run: " + " · ".join(parts) + "."


def model_name(run: Run) -> str:
    """The model a run measured (read once, by :func:`load_runs`)."""
    return run.model


def _measured_model(data: dict[str, Any]) -> str:
    """Recorded in the JSON, else read from its checkpoint, else the checkpoint's name."""
    if data.get("model"):
        return data["model"]
    ck = Path(data.get("checkpoint", "?"))
    from a2ats_tools.artifacts.checkpoint import read_config
    from a2ats_tools.errors import A2atsError

    try:
        return read_config(ck).model_name()
    except (A2atsError, OSError, ValueError):  # the checkpoint is not on this machine, or not readable
        return ck.name


def short_model_name(run: Run) -> str:
    """The model's name without the packaging detail in brackets (a table column)."""
    return model_name(run).split(" (", 1)[0]


def runtime_line(run: Run) -> str:
    """The A²ATS runtime settings the run used (its checkpoint's defaults plus its options)."""
    rt = run.data.get("runtime") or (run.data.get("settings") or {}).get("runtime") or {}
    if not rt:
        return ""
    shown = []
    for key, value in rt.items():
        if value is None or value in ([], ()):  # unset options (offload, prefill_chunk, dense_layers)
            continue
        if key == "buckets" and isinstance(value, dict):
            value = f"{value.get('mode')} ({len(value.get('centres', []))})"
        shown.append(f"{key} {value}")
    ck = run.data.get("checkpoint", "?")
    return f"Model {model_name(run)}, checkpoint `{Path(ck).name}`; runtime: " + ", ".join(shown) + "."


def _header(title: str, run: Run) -> list[str]:
    lines = [f"### {title}", "", f"*{caption(run)}*", ""]
    rt = runtime_line(run)
    return lines + ([rt, ""] if rt else [])


# --- sections ---------------------------------------------------------------------------------------------

Figure = Callable[[str, str, Callable[[Path], Any]], str]  # (file name, alt text, plot into a path) -> markdown


def pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def table(head: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head), *("| " + " | ".join(r) + " |" for r in rows), ""]


def recall_section(run: Run, figure: Figure) -> list[str]:
    from a2ats_tools.evaluation import plots

    r = run.data["recall"]
    lines = _header(f"Held-out attention-mass recall % (top-K recall %), {r['length']} tokens, mean over layers", run)
    lines.append(f"{r.get('sequences', 1)} held-out sequence(s) ({r.get('heldout', '?')}), "
                 f"{r.get('queries_per_sequence', '?')} query positions each; budget = fraction of the context per KV head.")
    lines.append("")
    rows = [[m] + [f"{pct(r['overall'][m].get(b, {}).get('mass'))} ({pct(r['overall'][m].get(b, {}).get('topk'))})"
                   for b in r["budgets"]] for m in r["methods"]]
    lines += table(["method", *(f"budget {b}" for b in r["budgets"])], rows)
    lines.append(figure("recall_vs_budget.png", "attention-mass recall vs budget",
                        lambda p: plots.plot_recall(r, p, "mass")))
    lines.append(figure("topk_recall_vs_budget.png", "top-K recall vs budget", lambda p: plots.plot_recall(r, p, "topk")))
    return lines + [""]


def perplexity_section(run: Run, figure: Figure) -> list[str]:
    p = run.data["perplexity"]
    texts = p.get("texts", 1)
    lines = _header(f"Decode-mode perplexity, last {p['n_decode']} of {p['length']} tokens, "
                    + (f"{texts} texts pooled" if texts > 1 else "one text"), run)
    dense = p["configs"].get("dense")
    head = ["configuration", "perplexity", "vs dense"] + (["vs dense per text (min–max)"] if texts > 1 else [])
    rows = []
    for name, c in p["configs"].items():
        row = [name, f"{c['perplexity']:.3f}", f"{c['perplexity'] / dense['perplexity']:.3f}×" if dense else "–"]
        if texts > 1:
            ratios = [a / b for a, b in zip(c.get("per_text", []), (dense or {}).get("per_text", []), strict=False)]
            row.append(f"{min(ratios):.3f}–{max(ratios):.3f}×" if ratios else "–")
        rows.append(row)
    return lines + table(head, rows)


def tasks_section(run: Run, figure: Figure) -> list[str]:
    from a2ats_tools.evaluation import plots

    t = run.data["tasks"]
    configs = t["configs"]
    lines = _header("Long-context tasks, exact-match score %", run)
    lines += [f"{t.get('samples', '?')} sample(s) per cell.", ""]
    rows = [[row["task"], str(row["length"])]
            + [f"{100 * row['scores'][c]['mean']:.0f}" if c in row["scores"] else "–" for c in configs]
            for row in t["rows"]]
    lines += table(["task", "length", *configs], rows)
    others = [c for c in configs if c != "dense"]
    same = [row for row in t["rows"] if row.get("same_as_dense")]
    if others and same:
        lines += ["Greedy outputs identical to dense's, token for token (samples):", ""]
        rows = [[row["task"], str(row["length"])]
                + [f"{row['same_as_dense'][c]}/{row['scores']['dense']['n']}" if c in row["same_as_dense"] else "–"
                   for c in others] for row in same]
        lines += table(["task", "length", *others], rows)
    lines.append(figure("tasks_vs_length.png", "task score vs context length", lambda p: plots.plot_tasks(t, p)))
    return lines + [""]


POINT_KEYS = {"context", "batch", "steps", "repeats", "contenders"}
CONTENDER_KEYS = {"prefill_s", "cache_fill_s", "step_latency_s", "tokens_per_s", "kv_device_bytes",
                  "device_peak_bytes", "process_bytes_after", "kv_read_bytes_per_step", "kv_write_bytes_per_step"}


def _value(v: Any) -> str:
    """A cell for a field this script does not know by name (fields the bench gains later)."""
    if isinstance(v, dict) and "median" in v:
        v = v["median"]
    if isinstance(v, bool) or v is None:
        return "–" if v is None else str(v).lower()
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


def _mib(b: Any, digits: int = 0) -> str:
    return "–" if b is None else f"{b / 2**20:.{digits}f}"


def bench_section(run: Run, figure: Figure) -> list[str]:

    b = run.data
    points = b.get("points") or []
    lines = _header(f"Decode speed and memory on {b.get('device', '?')}, {b.get('dtype', '?')}", run)
    if not points:
        return lines + ["No grid points in this run.", ""]
    if any("floor" in p for p in points):
        lines += scaling_table(points) + generate_table(points) + profile_table(points)
        return lines + _bench_figures(run, figure, points)
    lines += [f"{points[0].get('steps', '?')} timed steps per block, {points[0].get('repeats', '?')} blocks per "
              "contender, alternating in one process; speed-up = dense step time over the contender's, per block "
              "pair, median (min–max). Prefill: the shared dense prefill plus the contender's cache fill. KV MiB: "
              "K/V (and codes) on the compute device; RSS: the process after the point.", ""]
    point_extra = sorted({k for p in points for k in p if k not in POINT_KEYS})
    contender_extra = sorted({k for p in points for c in p["contenders"].values() for k in c
                              if k not in CONTENDER_KEYS and not k.startswith("speedup_vs_")})
    head = ["context", "batch", *point_extra, "contender", "tok/s", "step ms", "speed-up vs dense", "prefill s",
            "KV MiB", "RSS MiB", *contender_extra]
    rows = []
    for p in points:
        for name, c in p["contenders"].items():
            ref = next((k for k in c if k.startswith("speedup_vs_")), None)
            s = c.get(ref) if ref else None
            lat = c.get("step_latency_s") or {}
            rows.append([str(p["context"]), str(p["batch"]), *(_value(p.get(k)) for k in point_extra), name,
                         f"{c['tokens_per_s']['median']:.1f}",
                         f"{1000 * lat['median']:.0f}" if "median" in lat else "–",
                         _ratio(s),
                         f"{c['prefill_s']:.1f}", _mib(c.get("kv_device_bytes")), _mib(c.get("process_bytes_after")),
                         *(_value(c.get(k)) for k in contender_extra)])
    lines += table(head, rows)
    return lines + _bench_figures(run, figure, points)


def _bench_figures(run: Run, figure: Figure, points: list[dict]) -> list[str]:
    from a2ats_tools.bench.plots import plot_throughput

    b = run.data
    lines = [figure("throughput_vs_context.png", "decode throughput vs context length",
                    lambda path: plot_throughput(points, path, title=f"decode throughput ({b.get('device', '?')})"))]
    for png in sorted(run.path.parent.glob("*.png")):  # figures the bench draws that are not re-plotted here
        if png.name not in KNOWN_PNGS:
            lines.append(figure(f"bench_{png.name}", png.stem.replace("_", " "),
                                lambda path, src=png: shutil.copyfile(src, path)))
    if isinstance(b.get("kernels"), str) and b["kernels"].strip():
        lines += ["", "Kernel micro-benchmarks (`benchmarks/kernels.py`):", "", "```", b["kernels"].rstrip(), "```"]
    return lines + [""]


def _ms(stats: dict | None) -> str:
    """A step latency as median (min–max) ms."""
    if not stats:
        return "–"
    return f"{1000 * stats['median']:.0f} ({1000 * stats['min']:.0f}–{1000 * stats['max']:.0f})"


def _ratio(stats: dict | None) -> str:
    return "–" if not stats else f"{stats['median']:.2f}× ({stats['min']:.2f}–{stats['max']:.2f})"


def generate_table(points: list[dict]) -> list[str]:
    """The steps timed from outside through ``model.generate`` (``--generate``), beside the forward-only ones."""
    rows = []
    for p in points:
        floor = ((p.get("floor") or {}).get("generate") or {}).get("step_latency_s")
        for name, c in p["contenders"].items():
            g = c.get("generate")
            if g:
                rows.append([str(p["context"]), str(p["batch"]), name, _ms(g.get("step_latency_s")),
                             _ms(c.get("step_latency_s")), _ratio(g.get("speedup_vs_dense")),
                             _ratio(g.get("vs_floor")), _ms(floor)])
    if not rows:
        return []
    return ["", "Through `model.generate` (a logits processor stamps each token; the prefill left out), beside the "
            "forward-only step:", "", *table(["context", "batch", "contender", "generate ms", "forward ms",
                                             "dense / contender", "contender / floor", "floor generate ms"], rows)]


def profile_table(points: list[dict]) -> list[str]:
    """Where a step goes (``--profile``): torch.profiler time per step by group, ms."""
    groups = sorted({k for p in points for c in p["contenders"].values() for k in (c.get("profile") or {}).get("groups", {})})
    rows = [[str(p["context"]), str(p["batch"]), name,
             *(f"{1000 * c['profile']['groups'].get(k, 0.0):.1f}" for k in groups),
             f"{1000 * c['profile'].get('wall_s_per_step', 0.0):.0f}"]
            for p in points for name, c in p["contenders"].items() if c.get("profile")]
    if not rows:
        return []
    return ["", "Where a step goes (torch.profiler, ms per step; the profiler's own overhead is in the wall time):",
            "", *table(["context", "batch", "contender", *groups, "wall ms"], rows)]


def scaling_table(points: list[dict]) -> list[str]:
    """Bench points timed beside the floor: per point, each contender's step (ms), its ratio to dense and to the
    floor, and the memory: KV bytes on the compute device per contender and the process's peak RSS."""
    names = list(points[0]["contenders"])
    retrieval = names[1:]
    reads = [n for n in retrieval if any(p["contenders"][n].get("kv_read_bytes_per_step") is not None for p in points)]
    head = ["context", "batch", "cache", "floor ms", *(f"{n} ms" for n in names),
            *(f"dense / {n}" for n in retrieval), *(f"{n} / floor" for n in retrieval),
            *(f"KV MiB {n}" for n in names), *(f"KV read MiB/step {n}" for n in reads), "peak RSS MiB"]
    rows = []
    for p in points:
        c = p["contenders"]
        floor = (p.get("floor") or {}).get("step_latency_s")
        rss = (p.get("rss") or {}).get("peak_bytes")
        rows.append([str(p["context"]), str(p["batch"]), str(p.get("cache", "real")), _ms(floor),
                     *(_ms(c[n].get("step_latency_s")) for n in names),
                     *(_ratio(c[n].get("speedup_vs_dense")) for n in retrieval),
                     *(_ratio(c[n].get("vs_floor")) for n in retrieval),
                     *(_mib(c[n].get("kv_device_bytes")) for n in names),
                     *(_mib(c[n].get("kv_read_bytes_per_step"), 2) for n in reads), _mib(rss)])
    return [f"{points[0].get('steps', '?')} timed steps per block, {points[0].get('repeats', '?')} blocks per "
            "contender, alternating in one process with the floor (dense decoding from a short context, where "
            "attention costs almost nothing); ms: the median block's median step, (min–max) over blocks; ratios "
            "per block pair. Synthetic caches: a real prefill of N tokens tiled to the context, keys re-rotated "
            "([bench](bench.md#cache-kinds-real-and-synthetic)). Peak RSS: the process during the point "
            "(every contender's cache is alive at once)."
            + (" KV read: the K/V bytes one decode step reads of the cache (candidates' keys, kept rows' values; "
               "with offload, what moves from host to device)." if reads else ""), "", *table(head, rows)]


# --- summary: one number per cell ---------------------------------------------------------------------------

def _step_ms(point: dict | None) -> str:
    if not point:
        return "–"
    ms = point["step_ms"]
    return f"{ms['median']:.0f} ({ms['min']:.0f}–{ms['max']:.0f})"


def vllm_section(run: Run, figure: Figure) -> list[str]:
    """``benchmarks/vllm_decode.py``: each point's decode step, vLLM dense against A²ATS, from one run."""
    by = {(p["context"], p["batch"], p["contender"]): p for p in run.data["points"]}
    keys = sorted({(c, b) for c, b, _ in by})
    rows = []
    for context, batch in keys:
        dense, ours = by.get((context, batch, "vLLM dense")), by.get((context, batch, "A²ATS"))
        speedup = "–"
        if dense and ours:
            speedup = f"{dense['step_ms']['median'] / ours['step_ms']['median']:.2f}×"
        shared = max((p or {}).get("shared_prefix", 0) for p in (dense, ours))
        where = f"{context:,}" + (f" ({shared:,} shared)" if shared else "")
        rows.append([where, str(batch), _step_ms(dense), _step_ms(ours), speedup,
                     f"{dense['tokens_per_s']:.1f}" if dense else "–", f"{ours['tokens_per_s']:.1f}" if ours else "–",
                     f"{dense['prefill_s']:.0f} / {ours['prefill_s']:.0f}" if dense and ours else "–"])
    lines = [f"### vLLM {run.data.get('vllm', '?')}: decode step, A²ATS against vLLM dense", "", f"*{caption(run)}*", "",
             f"Model {model_name(run)}, checkpoint `{Path(run.data.get('checkpoint', '?')).name}` at its own settings; vLLM dense is the same "
             "checkpoint served with `A2ATS_SETTINGS=selector=dense`. Step: median over requests of (last token - "
             "first token) / (tokens - 1), min / median / max over the timed passes. A context marked *shared* gives the "
             "batch's prompts the same first tokens (prefilled once, prefix-cached; each request reads its own block "
             "table). "
             "[Serving with vLLM](serving-vllm.md).", ""]
    head = ["context", "batch", "vLLM dense step (ms)", "A²ATS step (ms)", "speed-up", "dense tok/s", "A²ATS tok/s",
            "prefill s (dense / A²ATS)"]
    return lines + table(head, rows)


def _budget(run: Run) -> float | int | None:
    rt = run.data.get("runtime") or (run.data.get("settings") or {}).get("runtime") or {}
    return rt.get("budget")


def summary_rows(runs: list[Run]) -> list[list[str]]:
    """The headline numbers at each run's runtime budget: recall against the exact top-K, perplexity and task
    score against dense, and decode throughput against dense at the longest context (batch 4 if measured)."""
    from a2ats_tools.evaluation.harness import budget_label

    recall, ppl, tasks, speed = [], [], [], []  # one list per measure, so the table reads in the page's order
    for run in runs:
        d, budget, model = run.data, _budget(run), short_model_name(run)
        label = budget_label(budget) if budget is not None else "?"
        r = d.get("recall")
        key = next((k for k in (r or {}).get("budgets", []) if budget is not None and float(k) == float(budget)), None)
        if r and key and "a2ats" in r["overall"] and "oracle" in r["overall"]:
            recall.append([model, f"held-out attention-mass recall, {r['length']} tokens, budget {label}",
                         f"{r['overall']['a2ats'][key]['mass']:.3f}", f"{r['overall']['oracle'][key]['mass']:.3f}",
                         "exact top-K"])
        p = d.get("perplexity")
        name = f"a2ats@{label}"
        if p and name in p["configs"] and "dense" in p["configs"]:
            ppl.append([model, f"decode perplexity, last {p['n_decode']} of {p['length']} tokens, budget {label}",
                         f"{p['configs'][name]['perplexity']:.2f}", f"{p['configs']['dense']['perplexity']:.2f}",
                         "dense"])
        t = d.get("tasks")
        if t and name in t["configs"] and "dense" in t["configs"]:
            cells = [row for row in t["rows"] if name in row["scores"] and "dense" in row["scores"]]
            lengths = sorted({row["length"] for row in cells})
            if cells:
                mean = {c: sum(row["scores"][c]["mean"] for row in cells) / len(cells) for c in (name, "dense")}
                n_tasks = len({row["task"] for row in cells})
                tasks.append([model, f"task exact-match, mean of {len(cells)} cells ({n_tasks} task{'s' * (n_tasks > 1)}, "
                             f"{lengths[0]}–{lengths[-1]} tokens), budget {label}",
                             f"{mean[name]:.2f}", f"{mean['dense']:.2f}", "dense"])
        points = d.get("points") or [] if run.kind == "bench" else []
        if points:
            longest = max(p["context"] for p in points)
            at = [p for p in points if p["context"] == longest]
            point = next((p for p in at if p["batch"] == 4), max(at, key=lambda p: p["batch"]))
            names = list(point["contenders"])
            if len(names) >= 2:
                dense, a2ats = (point["contenders"][n] for n in names[:2])
                cache = "" if point.get("cache", "real") == "real" else f", {point['cache']} cache"
                speed.append([model, f"decode tokens/s, batch {point['batch']}, context {longest}{cache}, {d.get('device', '?')}",
                             f"{a2ats['tokens_per_s']['median']:.1f}", f"{dense['tokens_per_s']['median']:.1f}",
                             names[0]])
    return recall + ppl + tasks + speed


SUMMARY_HEAD = ["model", "measure", "A²ATS", "reference", "reference is"]


def summary_block(runs: list[Run]) -> list[str]:
    """The summary table with a caption naming the machines, versions and commands (the README's table)."""
    rows = summary_rows(runs)
    if not rows:
        return ["No results rendered yet: run `python benchmarks/run_grid.py CHECKPOINT`.", ""]
    shown = [provenance(r.data) for r in runs if summary_rows([r])]
    machines = sorted({f"{p.get('cpu') or 'CPU not recorded'} ({p.get('cores') or '?'} cores)" for p in shown})
    versions = sorted({", ".join(f"{n} {p[n]}" for n in ("torch", "transformers") if p.get(n)) or "versions not recorded"
                       for p in shown})
    dates = sorted({(p.get("created") or "date not recorded")[:10] for p in shown})
    commits = sorted({p["commit"][:7] for p in shown if p.get("commit")})
    lines = table(SUMMARY_HEAD, rows)
    lines += [f"Measured on {'; '.join(machines)} with {'; '.join(versions)}, on {', '.join(dates)}"
              + (f" at commit {', '.join(f'`{c}`' for c in commits)}" if commits else "")
              + "; rendered by `benchmarks/report.py` from the JSON of:", ""]
    lines += [f"- `{p['command']}`" if p.get("command") else "- a run whose command was not recorded" for p in shown]
    return lines + [""]


# --- the page -----------------------------------------------------------------------------------------------

SECTIONS: list[tuple[str, str, str, Callable[[Run, Figure], list[str]]]] = [
    ("recall", "eval", "Held-out attention-mass recall", recall_section),
    ("perplexity", "eval", "Decode-mode perplexity", perplexity_section),
    ("tasks", "eval", "Long-context tasks", tasks_section),
    ("points", "bench", "Decode speed and memory", bench_section),
    ("points", "vllm", "Serving with vLLM", vllm_section),
]


def display(path: Path) -> str:
    path = path.resolve()
    try:
        return str(path.relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def render_page(runs: list[Run], figures: Path | None, page: Path = RESULTS_MD,
                sources: Iterable[str] = ()) -> tuple[str, list[Path]]:
    """The whole results page and the figures written for it (none when ``figures`` is None)."""
    import os

    written: list[Path] = []
    names: set[str] = set()

    def figure(name: str, alt: str, plot: Callable[[Path], Any]) -> str:
        stem, ext = name.rsplit(".", 1)
        n = 2
        while name in names:  # the same kind of figure from a second run
            name, n = f"{stem}-{n}.{ext}", n + 1
        names.add(name)
        if figures is None:
            return ""
        figures.mkdir(parents=True, exist_ok=True)
        plot(figures / name)
        written.append(figures / name)
        return f"![{alt}]({Path(os.path.relpath(figures / name, page.parent)).as_posix()})"

    src = " ".join(sources) or " ".join(display(r.path) for r in runs)
    lines = ["<!-- Generated by benchmarks/report.py from the JSON of the runs below; do not edit by hand. -->",
             "", "# Measured results", "",
             "Every table below is rendered from the JSON that `a2ats eval` (`results.json`) and `a2ats bench` "
             "(`bench.json`) write, and captioned with its run: the command, the commit, the machine, the torch and "
             "transformers versions and the date. Regenerate the page with "
             f"`python benchmarks/report.py {src}`, or measure and regenerate it with "
             "`python benchmarks/run_grid.py CHECKPOINT` ([benchmarks](../benchmarks/README.md)). What the measures "
             "are: [`a2ats eval`](eval.md) and [`a2ats bench`](bench.md).", "",
             "## Summary", "", "At each run's runtime budget; one number per cell.", "", *summary_block(runs)]
    sources_rows = [[f"`{display(r.path)}`", r.kind, ", ".join(k for k, kind, _, _ in SECTIONS if kind == r.kind and r.data.get(k))
                     or "–", (provenance(r.data).get("created") or "?")[:10]] for r in runs]
    lines += ["## Runs", "", *table(["JSON", "kind", "sections", "date"], sources_rows)]
    for key, kind, title, section in SECTIONS:
        chosen = [r for r in runs if r.kind == kind and r.data.get(key)]
        if not chosen:
            continue
        lines += [f"## {title}", ""]
        for run in chosen:
            lines += section(run, figure)
    notes = [(r, n) for r in runs for n in r.data.get("notes") or []]
    if notes:
        lines += ["## Notes from the runs", "", *(f"- `{display(r.path)}`: {n}" for r, n in notes), ""]
    return "\n".join(lines).rstrip() + "\n", written


def update_readme(readme: Path, block: list[str]) -> bool:
    """Replace the README's summary block; False if the README has none."""
    text = readme.read_text()
    if SUMMARY_BEGIN not in text or SUMMARY_END not in text:
        return False
    head, rest = text.split(SUMMARY_BEGIN, 1)
    tail = rest.split(SUMMARY_END, 1)[1]
    readme.write_text(head + SUMMARY_BEGIN + "\n\n" + "\n".join(block).rstrip() + "\n\n" + SUMMARY_END + tail)
    return True


def write_page(sources: list[Path], out: Path = RESULTS_MD, figures: Path = FIGURES, readme: Path | None = README,
               shown: Iterable[str] = ()) -> list[Path]:
    """Render ``out`` (and the README's summary block) from ``sources``; figures not drawn this time are removed
    from ``figures``, so the page never shows a figure from another run. Returns the files written."""
    from a2ats_tools.io import atomic_path

    runs = load_runs(sources)
    if not runs:
        raise SystemExit("report: no results.json or bench.json in " + ", ".join(map(str, sources)))
    text, drawn = render_page(runs, figures, out, shown)
    for stale in set(figures.glob("*.png")) - set(drawn):
        stale.unlink()
    with atomic_path(out) as tmp:
        tmp.write_text(text)
    written = [out, *drawn]
    if readme is not None and update_readme(readme, summary_block(runs)):
        written.append(readme)
    return written


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sources", nargs="+", type=Path, help="eval/bench output directories or their JSON files")
    ap.add_argument("--out", type=Path, default=RESULTS_MD, help="the page to write (default: docs/results.md)")
    ap.add_argument("--figures", type=Path, default=FIGURES, help="where its figures go (default: docs/figures)")
    ap.add_argument("--readme", type=Path, default=README, help="README whose summary block is rewritten")
    ap.add_argument("--no-readme", action="store_true", help="leave the README alone")
    args = ap.parse_args(argv)
    shown = [str(s) for s in args.sources]
    for path in write_page(args.sources, args.out, args.figures, None if args.no_readme else args.readme, shown):
        print(f"wrote {path}")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))  # run from a checkout without installing
    main()
