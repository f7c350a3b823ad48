"""benchmarks/report.py: the results page, its figures and the README's results table are rendered from the
JSON that `a2ats eval` and `a2ats bench` write, each table captioned with its run's provenance."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "report"


@pytest.fixture(scope="module")
def report():
    spec = importlib.util.spec_from_file_location("report", ROOT / "benchmarks" / "report.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def page(report, tmp_path_factory):
    out = tmp_path_factory.mktemp("page")
    (out / "figures").mkdir()
    (out / "figures" / "stale.png").write_bytes(b"not from this run")
    written = report.write_page([FIXTURE], out / "results.md", out / "figures", readme=None)
    return out, (out / "results.md").read_text(), written


def test_the_tables_hold_the_fixtures_numbers(page):
    _, text, _ = page
    assert "| a2ats | 85.7 (91.6) | 91.2 (84.8) |" in text  # recall: mass (top-K) per budget
    assert "| oracle | 85.6 (100.0) | 90.9 (100.0) |" in text
    assert "| a2ats@3% | 9.616 | 1.017× | 1.011–1.020× |" in text  # perplexity, vs dense, per text
    assert "| streaming@3% | 11.801 | 1.248× | 1.209–1.286× |" in text
    assert "| passkey | 1024 | 100 | 50 | 100 | 0 |" in text  # task scores %
    assert "| passkey | 2048 | 0/2 | 1/2 | 0/2 |" in text  # same output as dense
    # bench: one row per contender; fields the bench gains later (cache, floor) get columns of their own
    assert "| context | batch | cache | contender |" in text and text.count("floor |") == 1
    assert "| 8156 | 4 | synthetic (random keys) | a2ats | 28.3 | 141 | 2.73× (2.67–3.58) | 171.5 | 1444 | 3147 | 0.0456 |" in text
    assert "| 1024 | 4 | real | dense | 26.9 | 149 | – | 7.8 | 180 | 1536 | – |" in text
    assert "lengths above the model's context (8192) skipped" in text  # the runs' notes


def test_every_table_is_captioned_with_its_run(page):
    _, text, _ = page
    sections = re.split(r"^### ", text, flags=re.M)[1:]
    assert len(sections) == 4  # recall, perplexity, tasks, bench
    eval_cmd = "a2ats eval runs/smollm2-a2ats --stages recall,tasks,perplexity"
    for body in sections:
        caption = next(line for line in body.splitlines()[1:] if line.strip())
        assert caption.startswith("*Run: `a2ats ")
        assert "AMD EPYC 7B13 64-Core Processor, 2 cores" in caption
        assert "torch 2.13.0+cpu, transformers 5.24.0" in caption
        if caption.startswith(f"*Run: `{eval_cmd}"):
            assert "commit `1234567`" in caption and "2026-12-01" in caption
        else:
            assert "a2ats bench runs/smollm2-a2ats --contexts 1k,8k" in caption
            assert "commit `abcdef0`" in caption and "2026-12-02" in caption and "2 torch threads" in caption
            assert "load average 1.5 (1 min) when written" in caption


def test_the_summary_has_one_number_per_cell(report, page):
    _, text, _ = page
    summary = text.split("## Summary", 1)[1].split("## Runs", 1)[0]
    rows = [line for line in summary.splitlines() if line.startswith("| ") and not line.startswith("| model")]
    # the eval run records its model; the bench run's checkpoint is not on this machine: named by its directory
    assert rows == [
        "| SmolLM2-135M-Instruct | held-out attention-mass recall, 4096 tokens, budget 3% | 0.912 | 0.909 | exact top-K |",
        "| SmolLM2-135M-Instruct | decode perplexity, last 128 of 2048 tokens, budget 3% | 9.62 | 9.46 | dense |",
        "| SmolLM2-135M-Instruct | task exact-match, mean of 2 cells (1 task, 1024–2048 tokens), budget 3% | 0.75 | 0.75 | dense |",
        "| smollm2-a2ats | decode tokens/s, batch 4, context 8156, synthetic (random keys) cache, cpu | 28.3 | 9.8 | dense |",
    ]
    for row in rows:
        for cell in row.strip("|").split("|")[2:4]:
            float(cell)  # one number, nothing else
    assert "AMD EPYC 7B13 64-Core Processor (2 cores)" in summary and "2026-12-01, 2026-12-02" in summary
    assert "- `a2ats bench runs/smollm2-a2ats --contexts 1k,8k --batches 4 --steps 8 --repeats 3 -o runs/bench`" in summary


def test_the_figures_are_drawn_and_linked_and_stale_ones_go(page):
    out, text, written = page
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert sorted(Path(link).name for link in links) == sorted(p.name for p in written if p.suffix == ".png")
    assert {"recall_vs_budget.png", "tasks_vs_length.png", "throughput_vs_context.png"} <= {Path(x).name for x in links}
    for link in links:
        assert (out / link).read_bytes()[:4] == b"\x89PNG"
    assert not (out / "figures" / "stale.png").exists()


def test_missing_sections_and_provenance_are_tolerated(report, tmp_path):
    results = json.loads((FIXTURE / "eval" / "results.json").read_text())
    results["tasks"] = None
    del results["provenance"]  # a document written before provenance was recorded
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "results.json").write_text(json.dumps(results))
    text, figures = report.render_page(report.load_runs([tmp_path / "old"]), None, tmp_path / "results.md")
    assert "## Long-context tasks" not in text and "## Decode speed" not in text and not figures
    assert "## Held-out attention-mass recall" in text and "## Decode-mode perplexity" in text
    assert "*Run: command not recorded · commit not recorded · host ci-box, CPU not recorded" in text
    assert "| a2ats@3% | 9.616 | 1.017× |" in text


def test_the_command_line_rewrites_the_readme_summary_block(report, tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# tool\n\nintro\n\n{report.SUMMARY_BEGIN}\nold table\n{report.SUMMARY_END}\n\n## Limits\n")
    shutil.copytree(FIXTURE, tmp_path / "runs")
    report.main([str(tmp_path / "runs"), "--out", str(tmp_path / "docs" / "results.md"),
                 "--figures", str(tmp_path / "docs" / "figures"), "--readme", str(readme)])
    text = readme.read_text()
    assert "old table" not in text and text.startswith("# tool\n\nintro\n\n") and text.endswith("\n## Limits\n")
    assert "| decode tokens/s, batch 4, context 8156, synthetic (random keys) cache, cpu | 28.3 | 9.8 | dense |" in text
    assert (tmp_path / "docs" / "figures" / "throughput_vs_context.png").is_file()


def test_the_readme_table_is_the_results_page_summary(report):
    """Both come from one render of the same runs: the README's table cannot drift from the page."""
    readme = (ROOT / "README.md").read_text()
    page = (ROOT / "docs" / "results.md").read_text()
    block = readme.split(report.SUMMARY_BEGIN, 1)[1].split(report.SUMMARY_END, 1)[0]
    summary = page.split("## Summary", 1)[1].split("## Runs", 1)[0]
    assert any(line.startswith("| ") for line in block.splitlines())
    assert block.strip() in summary  # the table and its caption, word for word
    assert page.startswith("<!-- Generated by benchmarks/report.py")


def test_points_timed_beside_the_floor_render_as_one_scaling_table(report):
    def stats(ms: float) -> dict:
        return {"min": ms * 0.9 / 1000, "median": ms / 1000, "max": ms * 1.1 / 1000}

    point = {"context": 131072, "batch": 1, "cache": "synthetic(from 4096)", "steps": 8, "repeats": 3,
             "floor": {"context": 512, "step_latency_s": stats(50.0)}, "rss": {"peak_bytes": 3 * 2**30},
             "contenders": {
                 "dense": {"step_latency_s": stats(3000.0), "kv_device_bytes": 2**30,
                           "generate": {"step_latency_s": stats(3100.0)}},
                 "a2ats": {"step_latency_s": stats(150.0), "kv_device_bytes": 2**30 + 2**20,
                           "speedup_vs_dense": {"min": 19.0, "median": 20.0, "max": 21.0},
                           "vs_floor": {"min": 2.9, "median": 3.0, "max": 3.1},
                           "generate": {"step_latency_s": stats(160.0), "vs_floor": {"min": 3, "median": 3.2, "max": 3.4}},
                           "profile": {"wall_s_per_step": 0.2, "groups": {"fused CPU kernel": 0.09}}}}}
    lines = "\n".join(report.scaling_table([point]) + report.generate_table([point]) + report.profile_table([point]))
    assert ("| 131072 | 1 | synthetic(from 4096) | 50 (45–55) | 3000 (2700–3300) | 150 (135–165) | 20.00× (19.00–21.00)"
            " | 3.00× (2.90–3.10) | 1024 | 1025 | 3072 |") in lines
    assert "| 131072 | 1 | a2ats | 160 (144–176) | 150 (135–165) | – | 3.20× (3.00–3.40) | – |" in lines
    assert "| 131072 | 1 | a2ats | 90.0 | 200 |" in lines


def test_a_vllm_bench_renders_dense_beside_a2ats_with_the_speed_up(report, tmp_path):
    def point(contender: str, context: int, batch: int, ms: float) -> dict:
        return {"contender": contender, "context": context, "batch": batch, "tokens_per_s": batch * 1000 / ms,
                "step_ms": {"min": ms * 0.9, "median": ms, "max": ms * 1.1}, "prefill_s": 12.0, "new_tokens": 24}

    doc = {"schema": "a2ats.vllm-bench", "schema_version": 1, "checkpoint": "runs/smollm2-a2ats", "vllm": "0.32.0",
           "points": [point("vLLM dense", 8192, 1, 200.0), point("A²ATS", 8192, 1, 100.0)],
           "provenance": {"command": "benchmarks/vllm_decode.py runs/smollm2-a2ats", "created": "2026-12-07T10:00:00Z"}}
    (tmp_path / "bench-vllm").mkdir()
    (tmp_path / "bench-vllm" / "bench-vllm.json").write_text(json.dumps(doc))
    text, _ = report.render_page(report.load_runs([tmp_path / "bench-vllm"]), None, tmp_path / "results.md")
    assert "## Serving with vLLM" in text and "### vLLM 0.32.0" in text
    assert "| 8,192 | 1 | 200 (180–220) | 100 (90–110) | 2.00× | 5.0 | 10.0 | 12 / 12 |" in text
