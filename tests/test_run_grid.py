"""benchmarks/run_grid.py: the long-context grid's entries (the page itself is rendered by benchmarks/report.py,
tests/test_report.py)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_run_grid():
    spec = importlib.util.spec_from_file_location("run_grid", ROOT / "benchmarks" / "run_grid.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
