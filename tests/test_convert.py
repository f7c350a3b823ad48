"""``a2ats convert`` on synthetic calibrations of tiny models: the checkpoint, its report, errors, accelerate."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from a2ats_tools.artifacts.checkpoint import (
    A2atsConfig,
    is_converted,
    read_codebooks,
    read_config,
    write_codebooks,
    write_config,
)
from a2ats_tools.artifacts.model_files import check_geometry
from a2ats_tools.calibration.format import LayerStats, write_layer, write_manifest
from a2ats_tools.errors import A2atsError, ArtifactError, DataError
from a2ats_tools.models import geometry, rotary
from a2ats_tools.quantization import convert

from .conftest import build_tiny_model
from .test_reporting import Recording

ROOT = Path(__file__).resolve().parents[1]


def make_calibration(path: Path, model, model_dir: Path, keys_per_head: int = 512, seed: int = 0) -> Path:
    """A synthetic calibration of ``model``: clustered keys, anisotropic queries, exact WRoPE moments."""
    geo, rot = geometry(model), rotary(model)
    g = torch.Generator().manual_seed(seed)
    d, hkv, hq = geo.head_dim, geo.num_kv_heads, geo.num_heads
    positions = [64, 2048]
    scales = torch.linspace(0.2, 3.0, d)

    def keys(n: int) -> torch.Tensor:
        means = torch.randn(hkv, 24, d, generator=g) * 2
        pick = torch.randint(24, (hkv, n), generator=g)
        return means.gather(1, pick.unsqueeze(-1).expand(hkv, n, d)) + 0.5 * torch.randn(hkv, n, d, generator=g)

    for layer in range(geo.num_layers):
        q = torch.randn(hq, 300, d, generator=g, dtype=torch.float64) * scales.double()
        moment = torch.einsum("gmi,gmj->gij", q, q).reshape(hkv, hq // hkv, d, d).sum(1)
        wrope = torch.stack([rot.matrix(p).T @ moment @ rot.matrix(p) for p in positions])
        held_len = 256
        write_layer(path, layer, LayerStats(
            keys=keys(keys_per_head).half(),
            query_moment=moment,
            wrope_query_moment=wrope,
            query_count=torch.full((hkv,), (hq // hkv) * 300, dtype=torch.long),
            heldout_keys=keys(held_len).unsqueeze(0),
            heldout_queries=(torch.randn(1, hq, 4, d, generator=g) * scales),
            heldout_query_positions=torch.tensor([[120, 180, 230, 255]]),
        ))
    write_manifest(
        path, model={"path_or_id": str(model_dir), "gguf_file": None, "display_name": "tiny"}, geometry=geo,
        relative_positions=positions, tokens_by_source={"synthetic": keys_per_head}, heldout={"sequences": 1, "length": 256},
        key_dtype="float16", recipe={"name": "synthetic"}, seed=seed,
    )
    return path


@pytest.fixture(scope="module")
def tiny_llama():
    return build_tiny_model("llama")


@pytest.fixture()
def calib(tmp_path, tiny_llama, tiny_model_dirs) -> Path:
    return make_calibration(tmp_path / "calib", tiny_llama, tiny_model_dirs["llama"])


def test_convert_writes_a_complete_checkpoint(calib, tmp_path, tiny_model_dirs):
    out = convert(calib, tmp_path / "ckpt", codes=16, iters=5)
    assert is_converted(out) and not (tmp_path / ".ckpt.a2ats-partial").exists()
    config = read_config(out)
    assert config.codebook_size == 16 and config.whitening == "query_aware"
    assert config.buckets["mode"] == "log" and config.model["weights"] == "copied"
    codebooks, factors = read_codebooks(out, config)
    assert len(codebooks) == 2 and codebooks[0].shape == (2, 16, 16)
    assert all(torch.isfinite(c).all() and (c.abs().sum(-1) > 0).all() for c in codebooks.values())
    assert not torch.equal(factors[0][0], torch.eye(16))  # query-aware: a real whitening factor
    saved = json.loads((out / "config.json").read_text())
    assert saved["quantization_config"] == {"quant_method": "a2ats", "config_file": "a2ats_config.json"}
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    index = json.loads((out / "model.safetensors.index.json").read_text())  # the weights only: not the codebooks
    assert set(index["weight_map"].values()) == {"model.safetensors"}
    assert "model.layers.0.self_attn.k_proj.weight" in index["weight_map"]
    report = json.loads((out / "report.json").read_text())
    assert report["methods"] == ["query_aware_vq", "plain_vq", "exact_keys", "oracle"]
    for row in report["layers"]:
        for m in report["methods"]:
            assert 0.0 < row[m] <= 1.0 + 1e-6


def test_plain_light_and_single_bucket(calib, tmp_path):
    out = convert(calib, tmp_path / "plain", codes=8, iters=3, plain=True, light=True, buckets="single")
    config = read_config(out)
    _, factors = read_codebooks(out, config)
    assert config.whitening == "plain" and config.buckets["mode"] == "single"
    assert torch.equal(factors[1][0], torch.eye(16))
    assert config.model["weights"] == "referenced" and not (out / "config.json").exists()
    assert "plain_vq" not in json.loads((out / "report.json").read_text())["methods"]


def test_same_seed_is_bit_identical(calib, tmp_path):
    books = []
    for name in ("a", "b"):
        out = convert(calib, tmp_path / name, codes=16, iters=4, light=True, compare_plain=False)
        books.append(list(read_codebooks(out, read_config(out))[0].values()))
    assert all(torch.equal(x, y) for x, y in zip(*books, strict=True))


def test_algorithm_choice_is_recorded(calib, tmp_path):
    auto = convert(calib, tmp_path / "auto", codes=16, iters=3, light=True, compare_plain=False)
    lloyd = convert(calib, tmp_path / "lloyd", codes=16, iters=3, light=True, compare_plain=False,
                    algorithm="lloyd")
    for out, algorithm in ((auto, "two-level"), (lloyd, "lloyd")):  # auto on CPU: two-level
        training = json.loads((out / "report.json").read_text())["training"]
        assert training["algorithm"] == algorithm and read_config(out).extra["algorithm"] == algorithm
        assert training["coarse_cells"] == (4 if algorithm == "two-level" else None)
    a, b = (read_codebooks(o, read_config(o))[0].values() for o in (auto, lloyd))
    assert not all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    with pytest.raises(A2atsError, match="--algorithm"):
        convert(calib, tmp_path / "bad", codes=16, algorithm="elkan")


def test_recorded_settings_are_the_loaded_defaults(calib, tmp_path):
    from a2ats_tools.runtime.settings import RuntimeSettings

    out = convert(calib, tmp_path / "set", codes=8, iters=2, light=True, compare_plain=False,
                  settings="rerank=8,aggregation=max,budget=5%")
    config = read_config(out)
    assert (config.rerank, config.aggregation, config.budget) == (8, "max", 0.05)
    loaded = RuntimeSettings.from_config(config)
    assert (loaded.rerank, loaded.aggregation, loaded.budget) == (8, "max", 0.05)
    assert RuntimeSettings.from_config(config, rerank=2).rerank == 2  # load-time options still override
    default = read_config(convert(calib, tmp_path / "plain", codes=8, iters=2, light=True, compare_plain=False))
    assert default.rerank == RuntimeSettings.rerank and default.aggregation == RuntimeSettings.aggregation
    for bad, message in (("kernels=torch", "records only"), ("rerank=0.5", "over-fetch"), ("rerank", "KEY=VALUE")):
        with pytest.raises(A2atsError, match=message):
            convert(calib, tmp_path / "bad", codes=8, settings=bad)
        assert not (tmp_path / "bad").exists()  # refused before any training, nothing written


def test_too_few_keys_fails_or_shrinks(calib, tmp_path):
    with pytest.raises(DataError, match="--codes"):
        convert(calib, tmp_path / "x", codes=4096)
    assert not (tmp_path / "x").exists() or not is_converted(tmp_path / "x")
    reporter = Recording()
    out = convert(calib, tmp_path / "y", codes=4096, allow_shrink=True, iters=2, light=True, compare_plain=False,
                  reporter=reporter)
    assert read_config(out).codebook_size == 128  # a power of two at most a quarter of the 512 keys
    assert reporter.kinds("warn") == ["only 512 keys per head: shrinking the codebook from 4096 to 128 codes"]
    assert reporter.kinds("info")[-1] == f"wrote {out}"
    assert [bar["done"] for bar in reporter.bars] == [bar["total"] for bar in reporter.bars]  # every bar filled


def test_artifact_round_trip_and_geometry_check(tmp_path, tiny_llama):
    geo = geometry(tiny_llama)
    books = [torch.randn(2, 8, 16) for _ in range(2)]
    factors = [torch.linalg.cholesky(torch.eye(16) * 2).expand(2, 16, 16).clone() for _ in range(2)]
    config = A2atsConfig(geometry=geo, codebook_size=8, seed=3)
    write_codebooks(tmp_path, books, factors)
    write_config(tmp_path, config)
    read = read_config(tmp_path)
    assert read == config
    got_books, got_factors = read_codebooks(tmp_path, read)
    assert all(torch.equal(a, b) for a, b in zip(books + factors, [*got_books.values(), *got_factors.values()], strict=True))
    check_geometry(read, tiny_llama)
    with pytest.raises(ArtifactError, match="num_kv_heads"):
        check_geometry(read, build_tiny_model("llama", num_key_value_heads=1))


def _cli(*args: str, launcher: list[str] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = (launcher or [sys.executable, "-m"]) + ["a2ats_tools.cli", "convert", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_cli_refuses_existing_output_with_one_line(calib, tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    result = _cli(str(calib), "--out", str(tmp_path / "taken"), "--quiet")
    assert result.returncode == 2
    assert "already exists" in result.stderr and "Traceback" not in result.stderr


def test_accelerate_two_processes_match_one(calib, tmp_path):
    args = ["--codes", "16", "--iters", "4", "--light", "--no-compare-plain", "--quiet"]
    single = _cli(str(calib), "--out", str(tmp_path / "one"), *args)
    assert single.returncode == 0, single.stderr
    # on a CPU-only machine accelerate's torchrun launcher (--multi_gpu) starts the ranks; they use gloo
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m"]
    multi = _cli(str(calib), "--out", str(tmp_path / "two"), *args, launcher=launcher)
    assert multi.returncode == 0, multi.stderr[-3000:]
    assert read_config(tmp_path / "two").extra["processes"] == 2
    assert read_config(tmp_path / "one").extra["processes"] == 1
    one = read_codebooks(tmp_path / "one", read_config(tmp_path / "one"))[0]
    two = read_codebooks(tmp_path / "two", read_config(tmp_path / "two"))[0]
    assert all(torch.equal(a, b) for a, b in zip(one.values(), two.values(), strict=True))
