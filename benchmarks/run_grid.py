"""Run the standard eval + bench grid on a converted checkpoint, then regenerate docs/results.md, its figures
and the README's results table from the grid's JSON (benchmarks/report.py).

    python benchmarks/run_grid.py runs/smollm2-a2ats                 # full CPU grid (about 1.5 h on 2 cores)
    python benchmarks/run_grid.py runs/smollm2-a2ats --quick         # a smaller grid (tens of minutes)
    python benchmarks/run_grid.py --render-only runs/grid            # only rebuild docs from the grid's JSON
    python benchmarks/run_grid.py runs/smollm2-a2ats --skip-eval     # only the bench; the eval JSON in --out stays
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
import subprocess
import sys
from pathlib import Path

import report  # a sibling script: renders the page from the JSON

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
    report.main([str(out)])


if __name__ == "__main__":
    sys.path.insert(0, str(report.ROOT))  # run from a checkout without installing
    main()
