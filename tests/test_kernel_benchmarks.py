"""The kernel benchmark scripts still run (tiny sizes; on CPU the Triton one is an interpreter smoke run)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_script(*args: str) -> str:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_kernel_benchmark_checks_and_reports_each_op():
    out = run_script("benchmarks/kernels.py", "--tiny")
    for op in ("encode", "score", "sparse_decode"):
        assert any(line.startswith(op + " ") for line in out.splitlines()), out


def test_cpu_ops_benchmark_reports_each_op():
    out = run_script(
        "benchmarks/cpu_ops.py",
        "--tokens",
        "512",
        "--codes",
        "64",
        "--topk",
        "20",
        "--prefill",
        "16",
        "--repeat",
        "1",
        "--threads",
        "1",
    )
    for name in ("build_tables (sum)", "score (max)", "select (top-K)", "sparse_decode", "decode step"):
        assert name in out, out


def test_cpu_kernel_parts_benchmark_reports_each_part():
    from a2ats_tools.kernels import cpu_decode

    if not cpu_decode.available():
        pytest.skip(cpu_decode.unavailable_reason())
    out = run_script(
        "benchmarks/cpu_kernel_parts.py", "--tokens", "512", "--codes", "64", "--layers", "2", "--repeat", "1",
        "--threads", "1",
    )
    for name in ("default (P=3", "no re-rank", "one bucket, 128 tokens", "tables of 2 more buckets", "Python wrapper",
                 "torch bmm"):
        assert name in out, out


def test_triton_kernels_compile_for_a_gpu_without_one():
    """The interpreter accepts things a GPU compile rejects: compile each kernel for sm_90 ahead of time."""
    pytest.importorskip("triton")
    out = run_script("benchmarks/kernels.py", "--compile-only", "sm_90", "--head-dim", "128", "--group", "4")
    compiled = [line for line in out.splitlines() if " ok " in line]
    assert len(compiled) == 5, out
