"""Run the standard eval + bench grid on a converted checkpoint, then regenerate docs/figures/*.png and the
measured tables of docs/results.md.

    python benchmarks/run_grid.py runs/smollm2-a2ats                 # full CPU grid (about 1.5 h on 2 cores)
    python benchmarks/run_grid.py runs/smollm2-a2ats --quick         # a smaller grid (tens of minutes)
    python benchmarks/run_grid.py --render-only runs/grid            # only rebuild docs from earlier JSON
    python benchmarks/run_grid.py runs/smollm2-a2ats --skip-eval     # only the bench; other tables are kept
    python benchmarks/run_grid.py runs/smollm2-a2ats --also rerank=2 # and another configuration beside the default
    python benchmarks/run_grid.py runs/smollm2-a2ats --skip-eval --skip-bench --long  # only the long-context bench

The eval runs one `a2ats eval` per stage (recall, perplexity, tasks) into <out>/eval-<stage>/, and one
`a2ats bench` into <out>/bench/. GPU: pass --device cuda (and longer contexts to bench by hand).

--long adds the long-context bench (LONG): 1K..128K at batch 1, and batch 4 where the caches fit --memory-limit
(on 24 GiB: up to 32K), real prefills up to 8K and synthetic caches (a real 4K prefill tiled, keys re-rotated)
above 4K, so 8K runs both ways side by side; then one real 32K prefill beside a synthetic one (the prefill
time with its encode share, and a second real-vs-synthetic check). Results go to <out>/bench-long*/.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIGURES = ROOT / "docs" / "figures"
RESULTS_MD = ROOT / "docs" / "results.md"
BEGIN, END = "<!-- BEGIN MEASURED (benchmarks/run_grid.py) -->", "<!-- END MEASURED -->"
STAGES = ("recall", "perplexity", "tasks")

FULL = {
    "recall": ["--recall-length", "8192", "--recall-sequences", "2", "--budgets", "0.01,0.02,0.03,0.05,0.1",
               "--baselines", "streaming,quest,wrope,exact,norerank"],
    "perplexity": ["--ppl-length", "8192", "--ppl-tokens", "256", "--ppl-texts", "5", "--budgets", "0.03",
                   "--baselines", "streaming,quest,wrope,exact,norerank"],
    "tasks": ["--tasks", "all", "--lengths", "1024,2048,4096,8192", "--samples", "3", "--budgets", "0.03",
              "--baselines", "streaming,quest,wrope,norerank"],
    "bench": ["--contexts", "1024,2048,4096,8192", "--batches", "1,4,8", "--steps", "8", "--repeats", "3", "--also", "offload=cpu"],
}
LONG = {  # name -> `a2ats bench` arguments (--long)
    "bench-long": ["--contexts", "1k,2k,4k,8k,16k,32k,64k,128k", "--batches", "1,4", "--cache", "real:8k,synthetic:4k",
                   "--steps", "8", "--repeats", "3", "--also", "offload=cpu", "--memory-limit", "20"],
    "bench-long-prefill": ["--contexts", "32k", "--batches", "1", "--cache", "real,synthetic:4k", "--steps", "8",
                           "--repeats", "3"],
}
QUICK = {
    "recall": ["--recall-length", "4096", "--recall-sequences", "1", "--budgets", "0.01,0.03,0.1"],
    "perplexity": ["--ppl-length", "4096", "--ppl-tokens", "64", "--budgets", "0.03", "--baselines", "streaming"],
    "tasks": ["--tasks", "passkey,niah_single", "--lengths", "2048,4096", "--samples", "2", "--budgets", "0.03",
              "--baselines", "streaming"],
    "bench": ["--contexts", "2048,8192", "--batches", "1,4", "--steps", "8", "--repeats", "3"],
}


def run(cmd: list[str]) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def pct(x: float) -> str:
    return f"{100 * x:.1f}"


def previous_sections(block: str) -> dict[str, str]:
    """The sections of an earlier measured block, by source: ``eval-<stage>`` (from a "Checkpoint ..., stage(s)
    <stage>, ..." line to the next section) and ``bench`` (from "### Decode speed on" to the block's end)."""
    sections: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in block.splitlines():
        if line.startswith((BEGIN, END)):
            continue
        if line.startswith("Checkpoint `") and "stage(s) " in line:
            stage = line.split("stage(s) ", 1)[1].split(",", 1)[0].strip()
            current = sections.setdefault(f"eval-{stage}", [])
        elif line.startswith("### Decode speed on"):
            current = sections.setdefault("bench", [])
        if current is not None:
            current.append(line)
    return {name: "\n".join(body).strip("\n") + "\n" for name, body in sections.items()}


def render(eval_jsons: list[Path], bench_json: Path | None, previous: dict[str, str] | None = None) -> str:
    """Markdown tables for every eval result (one per stage) and the bench result that exist; a source without
    a result here keeps its section from ``previous`` (an earlier block), so re-running one stage (e.g.
    ``--skip-eval``) does not drop the others' tables."""
    previous = previous or {}
    lines = [BEGIN, ""]
    for eval_json in eval_jsons:
        if not eval_json.is_file():
            if eval_json.parent.name in previous:
                lines += [previous[eval_json.parent.name]]
            continue
        res = json.loads(eval_json.read_text())
        lines += [f"Checkpoint `{res['checkpoint']}`, stage(s) {', '.join(res['settings']['stages'])}, "
                  f"created {res['created']}.", ""]
        if res.get("recall"):
            r = res["recall"]
            lines += [f"### Held-out attention-mass recall % (top-K recall %), {r['length']} tokens, mean over layers", "",
                      "| method | " + " | ".join(r["budgets"]) + " |", "|---" * (len(r["budgets"]) + 1) + "|"]
            for m in r["methods"]:
                cells = [f"{pct(r['overall'][m][b]['mass'])} ({pct(r['overall'][m][b]['topk'])})" for b in r["budgets"]]
                lines.append(f"| {m} | " + " | ".join(cells) + " |")
            lines += ["", "![recall vs budget](figures/recall_vs_budget.png)", ""]
        if res.get("tasks"):
            t = res["tasks"]
            lines += ["### Long-context tasks, exact-match score %", "",
                      "| task | length | " + " | ".join(t["configs"]) + " |", "|---" * (len(t["configs"]) + 2) + "|"]
            for row in t["rows"]:
                cells = [f"{100 * row['scores'][c]['mean']:.0f}" for c in t["configs"]]
                lines.append(f"| {row['task']} | {row['length']} | " + " | ".join(cells) + " |")
            same = [c for c in t["configs"] if c != "dense"]
            if same and all(row.get("same_as_dense") for row in t["rows"]):
                lines += ["", "Greedy outputs identical to dense's, token for token (samples):", "",
                          "| task | length | " + " | ".join(same) + " |", "|---" * (len(same) + 2) + "|"]
                for row in t["rows"]:
                    n = row["scores"]["dense"]["n"]
                    lines.append(f"| {row['task']} | {row['length']} | "
                                 + " | ".join(f"{row['same_as_dense'][c]}/{n}" for c in same) + " |")
            lines += ["", "![task score vs context](figures/tasks_vs_length.png)", ""]
        if res.get("perplexity"):
            p = res["perplexity"]
            dense = p["configs"]["dense"]["perplexity"]
            texts = p.get("texts", 1)
            per_text = texts > 1
            lines += [f"### Decode-mode perplexity, last {p['n_decode']} of {p['length']} tokens"
                      + (f", {texts} texts (pooled)" if per_text else ""), "",
                      "| configuration | perplexity | vs dense |" + (" per text (min–max) |" if per_text else ""),
                      "|---|---|---|" + ("---|" if per_text else "")]
            dense_texts = p["configs"]["dense"].get("per_text", [])
            for name, c in p["configs"].items():
                line = f"| {name} | {c['perplexity']:.3f} | {c['perplexity'] / dense:.3f}× |"
                if per_text:
                    ratios = [a / b for a, b in zip(c["per_text"], dense_texts, strict=True)]
                    line += f" {min(ratios):.3f}–{max(ratios):.3f}× |"
                lines.append(line)
            lines.append("")
    if bench_json and bench_json.is_file():
        b = json.loads(bench_json.read_text())
        names = list(b["points"][0]["contenders"]) if b["points"] else []
        lines += [f"### Decode speed on {b['device']} ({b['torch_threads']} threads), {b['dtype']}", "",
                  "| context | batch | " + " | ".join(f"{n} tok/s" for n in names)
                  + " | speed-up vs dense (min/median/max) | prefill s (dense / a2ats) | KV MiB on the device ("
                  + " / ".join(names) + ") |",
                  "|---" * (len(names) + 5) + "|"]
        for pt in b["points"]:
            c = pt["contenders"]
            s = c["a2ats"]["speedup_vs_dense"]
            lines.append(
                f"| {pt['context']} | {pt['batch']} | " + " | ".join(f"{c[n]['tokens_per_s']['median']:.1f}" for n in names)
                + f" | {s['min']:.2f} / {s['median']:.2f} / {s['max']:.2f}"
                + f" | {c['dense']['prefill_s']:.1f} / {c['a2ats']['prefill_s']:.1f}"
                + " | " + " / ".join(f"{c[n]['kv_device_bytes'] / 2**20:.0f}" for n in names) + " |"
            )
        lines += ["", "![throughput vs context](figures/throughput_vs_context.png)", ""]
    elif "bench" in previous:
        lines += [previous["bench"]]
    lines.append(END)
    return "\n".join(lines)


def measured_block() -> str:
    """The measured block now in docs/results.md ('' if none)."""
    text = RESULTS_MD.read_text() if RESULTS_MD.is_file() else ""
    return text[text.index(BEGIN) : text.index(END) + len(END)] if BEGIN in text and END in text else ""


def update_results_md(block: str) -> None:
    text = RESULTS_MD.read_text() if RESULTS_MD.is_file() else "# Measured results\n\n"
    if BEGIN in text and END in text:
        text = text[: text.index(BEGIN)] + block + text[text.index(END) + len(END) :]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    RESULTS_MD.write_text(text)


def copy_figures(out: Path) -> None:
    FIGURES.mkdir(parents=True, exist_ok=True)
    for src, name in ((out / "eval-recall" / "recall.png", "recall_vs_budget.png"),
                      (out / "eval-recall" / "recall_topk.png", "topk_recall_vs_budget.png"),
                      (out / "eval-tasks" / "tasks.png", "tasks_vs_length.png"),
                      (out / "bench" / "throughput.png", "throughput_vs_context.png"),
                      (out / "bench-long" / "latency.png", "latency_vs_context.png")):
        if src.is_file():
            shutil.copyfile(src, FIGURES / name)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="converted checkpoint (or, with --render-only, a grid output directory)")
    ap.add_argument("--out", default="runs/grid", help="where the eval-*/ and bench/ results go")
    ap.add_argument("--quick", action="store_true", help="a smaller grid")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--render-only", action="store_true", help="only rebuild docs from <checkpoint>/eval-*/ and /bench")
    ap.add_argument("--skip-eval", action="store_true")
    ap.add_argument("--skip-bench", action="store_true")
    ap.add_argument("--long", action="store_true", help="also the long-context bench (LONG), into <out>/bench-long*/")
    ap.add_argument("--also", action="append", default=[], metavar="KEY=VALUE,...",
                    help="another A²ATS configuration for the perplexity, tasks and bench stages (repeatable)")
    args = ap.parse_args()
    also = [arg for spec in args.also for arg in ("--also", spec)]
    out = Path(args.checkpoint if args.render_only else args.out)
    grid = QUICK if args.quick else FULL
    cli = [sys.executable, "-m", "a2ats_tools.cli"]
    if not args.render_only:
        if not args.skip_eval:
            for stage in STAGES:
                run([*cli, "eval", args.checkpoint, "--stages", stage, "--out", str(out / f"eval-{stage}"), "--overwrite",
                     "--quiet", "--device", args.device, *grid[stage], *(also if stage != "recall" else [])])
        if not args.skip_bench:
            run([*cli, "bench", args.checkpoint, "--out", str(out / "bench"), "--overwrite", "--device", args.device,
                 *grid["bench"], *also])
        if args.long:
            for name, bench_args in LONG.items():
                run([*cli, "bench", args.checkpoint, "--out", str(out / name), "--overwrite", "--device", args.device,
                     *bench_args])
    copy_figures(out)
    previous = previous_sections(measured_block())
    update_results_md(render([out / f"eval-{s}" / "results.json" for s in STAGES], out / "bench" / "bench.json", previous))
    print(f"updated {RESULTS_MD} and {FIGURES}")


if __name__ == "__main__":
    main()
