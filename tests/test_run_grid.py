"""benchmarks/run_grid.py: re-rendering the measured block of docs/results.md keeps the sections it has no new
results for, and replaces the ones it has."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_run_grid():
    spec = importlib.util.spec_from_file_location("run_grid", ROOT / "benchmarks" / "run_grid.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_render_without_results_gives_the_docs_block_back(tmp_path):
    rg = load_run_grid()
    block = rg.measured_block()
    assert block, "docs/results.md has a measured block"
    previous = rg.previous_sections(block)
    assert {"eval-recall", "eval-perplexity", "eval-tasks", "bench"} <= set(previous)
    missing = [tmp_path / f"eval-{s}" / "results.json" for s in rg.STAGES]
    assert rg.render(missing, tmp_path / "bench" / "bench.json", previous).split() == block.split()


def test_a_new_bench_replaces_only_the_bench_section(tmp_path):
    rg = load_run_grid()
    previous = rg.previous_sections(rg.measured_block())
    point = {"context": 512, "batch": 3, "contenders": {
        "dense": {"tokens_per_s": {"median": 10.0}, "prefill_s": 1.0, "kv_device_bytes": 2**20},
        "a2ats": {"tokens_per_s": {"median": 25.0}, "prefill_s": 1.5, "kv_device_bytes": 2**21,
                  "speedup_vs_dense": {"min": 2.4, "median": 2.5, "max": 2.6}}}}
    bench = tmp_path / "bench" / "bench.json"
    bench.parent.mkdir()
    bench.write_text(json.dumps({"device": "cpu", "torch_threads": 2, "dtype": "float32", "points": [point]}))
    missing = [tmp_path / f"eval-{s}" / "results.json" for s in rg.STAGES]
    out = rg.render(missing, bench, previous)
    assert "| 512 | 3 | 10.0 | 25.0 | 2.40 / 2.50 / 2.60 | 1.0 / 1.5 | 1 / 2 |" in out
    assert previous["bench"].splitlines()[4] not in out  # the old bench rows are gone
    for name in ("eval-recall", "eval-perplexity", "eval-tasks"):
        assert previous[name] in out


def test_the_long_grid_covers_its_contexts_and_checks_synthetic_against_real():
    """Every context of the long-context entries has a cache kind; 8K and 32K run real and synthetic side by side."""
    from a2ats_tools.bench.grid import parse_cache_kinds
    from a2ats_tools.evaluation.options import parse_int_list

    rg = load_run_grid()
    both = set()
    for args in rg.LONG.values():
        opts = dict(zip(args[::2], args[1::2], strict=True))
        kinds = parse_cache_kinds(opts["--cache"])
        for context in parse_int_list(opts["--contexts"], "--contexts"):
            covering = [k.kind for k in kinds if k.covers(context)]
            assert covering, (context, opts["--cache"])
            if set(covering) == {"real", "synthetic"}:
                both.add(context)
    assert {8192, 32768} <= both
