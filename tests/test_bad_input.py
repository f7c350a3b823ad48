"""Inputs at and past the edges: codebooks too large for int16 codes, concurrent or failing writes of a
converted checkpoint or a calibration, and budgets outside their rule."""

from __future__ import annotations

import fcntl
import importlib
import json
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from a2ats_tools.artifacts.checkpoint import A2atsConfig, is_converted, write_codebooks, write_config
from a2ats_tools.compat import cache_kwargs
from a2ats_tools.errors import A2atsError
from a2ats_tools.io import atomic_directory
from a2ats_tools.kernels import cpu_decode
from a2ats_tools.kernels.encode import code_dtype
from a2ats_tools.models import geometry, rotary
from a2ats_tools.runtime.selectors import A2atsSelector
from a2ats_tools.runtime.settings import RuntimeSettings

from .conftest import build_tiny_model

BIG_CODES = 40_000  # past int16: codes above 32767 would wrap negative
needs_kernel = pytest.mark.skipif(not cpu_decode.available(), reason=cpu_decode.unavailable_reason() or "built")


# --- codebooks beyond int16 --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("codes", "dtype"), [(1, torch.int16), (4096, torch.int16), (32767, torch.int16), (32768, torch.int32),
                         (BIG_CODES, torch.int32)],
)
def test_code_dtype_holds_every_code(codes, dtype):
    assert code_dtype(codes) == dtype
    assert torch.iinfo(dtype).max >= codes - 1


def big_selector(kernels: str, seed: int = 0) -> A2atsSelector:
    """A selector over a random codebook of ``BIG_CODES`` codes (the tiny llama's rotary, head_dim 16)."""
    g = torch.Generator().manual_seed(seed)
    hkv, d = 2, 16
    settings = RuntimeSettings(kernels=kernels, n_sink=2, window=4, budget=8)
    return A2atsSelector(settings, 0, 4, hkv, d, codebook=torch.randn(hkv, BIG_CODES, d, generator=g),
                         whitening=torch.eye(d).expand(hkv, d, d), rotary=rotary(build_tiny_model("llama")))


@pytest.mark.parametrize("kernels", ["torch", "auto"])
def test_encode_beyond_int16_gives_the_nearest_code_unwrapped(kernels):
    """Keys near centroids past 32767 (and some below) come back as those codes, int32 and non-negative,
    equal to a brute-force argmin; ``auto`` (the fused CPU kernel where built) falls back to torch."""
    sel = big_selector(kernels)
    centroids = sel.codebook_t.transpose(1, 2)  # [Hkv, C, d]
    want = torch.tensor([[BIG_CODES - 1, 32767, 32768, 5, 39000], [33000, 0, 35000, 32766, 20000]])  # [Hkv, n]
    g = torch.Generator().manual_seed(1)
    keys = torch.stack([centroids[h, want[h]] for h in range(2)]).unsqueeze(0)  # [1, Hkv, n, d]
    keys = keys + 1e-3 * torch.randn(keys.shape, generator=g)
    codes = sel.encode(keys)
    assert codes.dtype == torch.int32 and int(codes.min()) >= 0
    brute = torch.cdist(keys[0], centroids).argmin(-1)  # identity whitening: plain distances
    assert torch.equal(codes[0].long(), brute) and torch.equal(brute, want)


@pytest.fixture(scope="module")
def big_checkpoint(tmp_path_factory, tokenizer) -> Path:
    """The tiny llama as a converted checkpoint with random codebooks of ``BIG_CODES`` codes."""
    directory = tmp_path_factory.mktemp("big-codes")
    model = build_tiny_model("llama")
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    geo = geometry(model)
    g = torch.Generator().manual_seed(2)
    books = [torch.randn(geo.num_kv_heads, BIG_CODES, geo.head_dim, generator=g) for _ in range(geo.num_layers)]
    eye = torch.eye(geo.head_dim).expand(geo.num_kv_heads, -1, -1).contiguous()
    write_codebooks(directory, books, [eye.clone() for _ in range(geo.num_layers)])
    cfg = json.loads((directory / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "a2ats", "config_file": "a2ats_config.json"}
    (directory / "config.json").write_text(json.dumps(cfg))
    write_config(directory, A2atsConfig(geometry=geo, codebook_size=BIG_CODES, whitening="plain"))
    return directory


@pytest.mark.parametrize("kernels", ["torch", "auto"])
def test_decode_with_a_codebook_beyond_int16(big_checkpoint, kernels):
    """Prefill and decode through the runtime: int32 codes in the cache, each a key's nearest centroid, and
    the same logits whether the fused CPU kernel is allowed (it declines int32 codes) or not."""
    from a2ats_tools import load_converted

    model, _ = load_converted(big_checkpoint, budget=6, n_sink=2, window=4, kernels=kernels)
    reference, _ = load_converted(big_checkpoint, budget=6, n_sink=2, window=4, kernels="torch")
    ids = torch.randint(0, 49152, (2, 40), generator=torch.Generator().manual_seed(3))
    caches, logits = [model.a2ats.new_cache(), reference.a2ats.new_cache()], []
    with torch.no_grad():
        for m, cache in zip((model, reference), caches, strict=True):
            out = m(input_ids=ids, **cache_kwargs(cache), use_cache=True)
            steps = [m(input_ids=ids[:, i : i + 1], **cache_kwargs(cache), use_cache=True).logits for i in range(3)]
            logits.append(torch.cat([out.logits[:, -1:], *steps], 1))
    assert torch.isfinite(logits[0]).all()
    torch.testing.assert_close(logits[0], logits[1])
    for layer in caches[0].layers:
        codes = layer.state.meta["codes"][:, :, :40]
        assert codes.dtype == torch.int32 and int(codes.min()) >= 0 and int(codes.max()) < BIG_CODES
        assert torch.equal(codes, layer.selector.encode(_pre_rope_keys(layer, 40)))


def _pre_rope_keys(layer, n: int) -> torch.Tensor:
    """The first ``n`` cached keys of ``layer`` taken back to pre-RoPE form."""
    from a2ats_tools.rope import undo_rope

    rot = rotary(build_tiny_model("llama"))
    cos, sin = rot.cos_sin(torch.arange(n))
    return undo_rope(layer.state.keys[:, :, :n].float(), cos, sin)


@needs_kernel
@pytest.mark.parametrize(
    ("codes", "why"),
    [
        (torch.full((2, 2, 8), 3, dtype=torch.int32), "int16"),
        (torch.tensor([-1, 3] * 4, dtype=torch.int16).expand(2, 2, 8), r"\[0, 32\)"),
        (torch.tensor([32, 3] * 4, dtype=torch.int16).expand(2, 2, 8), r"\[0, 32\)"),
    ],
)
def test_fused_kernel_refuses_codes_it_cannot_index(codes, why):
    """The fused kernel reads score tables through raw codes: int32 codes are refused before it runs, codes
    outside the codebook as it reads them (clamped: no table is read out of bounds)."""
    b, hkv, hq, d, c, length = 2, 2, 4, 16, 32, 8
    g = torch.Generator().manual_seed(4)
    tiles = cpu_decode.codebook_tiles(torch.randn(hkv, c, d, generator=g))
    cos, sin = torch.ones(b, d), torch.zeros(b, d)
    plan = cpu_decode.plan_step(cos, sin, torch.zeros(length, dtype=torch.int64), length, 1, 2, 2, 0.0, "sum")
    kv = torch.randn(b, hkv, length, d, generator=g)
    with pytest.raises(ValueError, match=why):
        cpu_decode.decode_layer(plan, torch.randn(b, hq, d, generator=g), cos[:1], sin[:1], tiles, codes, kv, kv, 0.25)
    with pytest.raises(ValueError, match="32767"):
        cpu_decode.encode(torch.randn(hkv, 3, d), cpu_decode.codebook_tiles(torch.randn(hkv, 32768, d)),
                          torch.zeros(hkv, 32768))


# --- concurrent and failing writes of one output directory -------------------------------------------------


def partials(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f".{out.name}.a2ats-*"))


@contextmanager
def held_lock(out: Path):
    """Hold ``out``'s writer lock as another writer would."""
    with open(out.parent / f".{out.name}.a2ats-lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        yield


@pytest.mark.parametrize("before", ["missing", "empty", "full", "file"])
def test_atomic_directory_swaps_in_and_clears_stale_partials(tmp_path, before):
    out = tmp_path / "out"
    if before == "empty":
        out.mkdir()
    elif before == "full":
        out.mkdir()
        (out / "old").write_text("old")
    elif before == "file":
        out.write_text("old")
    (tmp_path / ".out.a2ats-partial-killed").mkdir()  # left by a killed run
    with atomic_directory(out, overwrite=True) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".out.a2ats-partial-") and not any(tmp.iterdir())
        assert not (tmp_path / ".out.a2ats-partial-killed").exists()
        (tmp / "new").write_text("new")
        assert before == "missing" or out.exists()  # the previous output stays until the swap
    assert [p.name for p in out.iterdir()] == ["new"] and partials(out) == []


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_atomic_directory_failure_keeps_the_previous_output(tmp_path, error):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old").write_text("old")
    with pytest.raises(error), atomic_directory(out, overwrite=True) as tmp:
        (tmp / "half").write_text("x")
        raise error
    assert [p.name for p in out.iterdir()] == ["old"] and partials(out) == []


def test_atomic_directory_refuses_a_second_writer(tmp_path):
    out = tmp_path / "out"
    with atomic_directory(out, overwrite=False, writer="convert"):
        with pytest.raises(A2atsError, match=f"another convert is writing {out}") as err:
            with atomic_directory(out, overwrite=True, writer="convert"):
                pass
        assert "\n" not in str(err.value)
    assert not out.exists() or not any(out.iterdir())


@pytest.fixture()
def calibration(tmp_path, tiny_model_dirs) -> Path:
    from .test_convert import make_calibration

    return make_calibration(tmp_path / "calib", build_tiny_model("llama"), tiny_model_dirs["llama"], keys_per_head=128)


def quick_convert(calib: Path, out: Path, **kw) -> Path:
    from a2ats_tools.quantization import convert

    return convert(calib, out, codes=16, iters=2, light=True, compare_plain=False, **kw)


def test_two_converts_of_one_out(calibration, tmp_path, monkeypatch):
    """A second convert of the same ``--out`` while the first runs fails at once with one line; the first
    finishes and its checkpoint loads."""
    from a2ats_tools import load_converted

    convert_module = importlib.import_module("a2ats_tools.quantization.convert")
    out, second = tmp_path / "ckpt", []
    build_report = convert_module.build_report

    def report_and_race(*args, **kwargs):  # the first convert is midway: its partial directory is being filled
        with pytest.raises(A2atsError, match="another convert is writing") as err:
            quick_convert(calibration, out, overwrite=True)
        second.append(str(err.value))
        return build_report(*args, **kwargs)

    monkeypatch.setattr(convert_module, "build_report", report_and_race)
    quick_convert(calibration, out)
    assert len(second) == 1 and "\n" not in second[0]
    assert load_converted(out)[0].a2ats is not None and partials(out) == []


def test_convert_while_the_lock_is_held_fails_cleanly(calibration, tmp_path):
    out = tmp_path / "ckpt"
    with held_lock(out), pytest.raises(A2atsError, match="another convert is writing"):
        quick_convert(calibration, out)
    assert not out.exists()
    assert is_converted(quick_convert(calibration, out)) and partials(out) == []


@pytest.mark.parametrize("error", [RuntimeError("report failed"), KeyboardInterrupt()])
def test_failing_convert_keeps_the_previous_checkpoint(calibration, tmp_path, monkeypatch, error):
    convert_module = importlib.import_module("a2ats_tools.quantization.convert")
    out = quick_convert(calibration, tmp_path / "ckpt")
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(convert_module, "build_report", fail)
    with pytest.raises(type(error)):
        quick_convert(calibration, out, overwrite=True, seed=1)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before and is_converted(out)
    assert partials(out) == []


def tiny_calibrate(out: Path, model_dir: Path, corpus: Path, **kw):
    from a2ats_tools.calibration import calibrate
    from a2ats_tools.calibration.recipe import HeldoutSpec, Recipe, SourceSpec

    recipe = Recipe(name="tiny", sources=(SourceSpec("files", 100, name="text", options={"path": str(corpus)}),),
                    heldout=HeldoutSpec(1, 64, 8), chunk_size=50)
    return calibrate(out, model=str(model_dir), recipe=recipe, positions="2048", max_length=128,
                     allow_few_tokens=True, **kw)


@pytest.fixture()
def corpus(tmp_path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text(" ".join(f"Sentence {i} is about item {i * 7 % 13}." for i in range(200)))
    return path


@pytest.mark.parametrize("error", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_failing_calibrate_overwrite_keeps_the_previous_calibration(tmp_path, tiny_model_dirs, corpus, monkeypatch,
                                                                    error):
    from a2ats_tools.calibration import CalibrationSet, accumulate

    out = tmp_path / "calib"
    tiny_calibrate(out, tiny_model_dirs["llama"], corpus)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    write_layer = accumulate.write_layer

    def failing_write(directory, layer, stats):
        if layer == 1:  # midway: layer 0 of the new calibration is written
            raise error
        write_layer(directory, layer, stats)

    monkeypatch.setattr(accumulate, "write_layer", failing_write)
    with pytest.raises(type(error)):
        tiny_calibrate(out, tiny_model_dirs["llama"], corpus, overwrite=True, seed=1)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert CalibrationSet(out).num_layers == 2 and partials(out) == []


def test_calibrate_while_the_lock_is_held_fails_cleanly(tmp_path, tiny_model_dirs, corpus):
    out = tmp_path / "calib"
    with held_lock(out), pytest.raises(A2atsError, match="another calibrate is writing"):
        tiny_calibrate(out, tiny_model_dirs["llama"], corpus)
    assert not out.exists()


# --- budgets -----------------------------------------------------------------------------------------------

GOOD_BUDGETS = [
    (0.03, 0.03), ("3%", 0.03), ("0.5", 0.5), ("0.5%", 0.005), (1.0, 1.0), ("1.0", 1.0), ("100%", 1.0),
    (1, 1), ("1", 1), (256, 256), ("256", 256), (512.0, 512), (" 8 ", 8),
]
BAD_BUDGETS = [
    0, 0.0, "0", "0%", -1, -0.5, "-3%", 1.5, "1.5", "150%", "100.5%", 2.5, float("nan"), "nan", "nan%",
    float("inf"), "inf", "lots", "", "%", True, None,
]


@pytest.mark.parametrize(("value", "want"), GOOD_BUDGETS)
def test_good_budgets(value, want):
    from a2ats_tools.runtime.settings import parse_budget

    for got in (parse_budget(value), RuntimeSettings(budget=value).budget, RuntimeSettings().with_overrides(
            budget=value).budget):
        assert got == want and type(got) is type(want)


@pytest.mark.parametrize("value", BAD_BUDGETS)
def test_bad_budgets_are_one_line_errors_naming_the_rule(value):
    from a2ats_tools.runtime.settings import parse_budget

    for make in (parse_budget, lambda v: RuntimeSettings(budget=v)):
        with pytest.raises(A2atsError, match=r"fraction in \(0, 1\].*percentage in \(0%, 100%\].*>= 1") as err:
            make(value)
        assert "\n" not in str(err.value)
    if value is not None:  # with_overrides ignores None: no override
        with pytest.raises(A2atsError, match="budget must be"):
            RuntimeSettings().with_overrides(budget=value)


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory, tokenizer) -> Path:
    from .test_runtime import make_checkpoint

    return make_checkpoint(build_tiny_model("llama"), tmp_path_factory.mktemp("budget-ckpt"), tokenizer)


@pytest.mark.parametrize("value", ["1.5", "150%", "0", "0%", "-2", "nan"])
def test_generate_cli_refuses_a_bad_budget_with_one_line(small_checkpoint, monkeypatch, capsys, value):
    import sys

    from a2ats_tools.cli import main

    monkeypatch.setattr(sys, "argv", ["a2ats", "generate", str(small_checkpoint), "-p", "hi", "--budget", value])
    with pytest.raises(SystemExit) as exit_info:
        main()
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and "Traceback" not in err
    assert "budget must be a fraction in (0, 1]" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("value", [1.5, "150%", 0])
def test_load_converted_configure_and_config_file_refuse_a_bad_budget(small_checkpoint, tmp_path, value):
    import shutil

    from a2ats_tools import load_converted

    with pytest.raises(A2atsError, match="budget must be"):
        load_converted(small_checkpoint, budget=value)
    model, _ = load_converted(small_checkpoint)
    with pytest.raises(A2atsError, match="budget must be"):
        model.a2ats.configure(budget=value)
    edited = Path(shutil.copytree(small_checkpoint, tmp_path / "edited"))
    config = json.loads((edited / "a2ats_config.json").read_text())
    config["budget"] = value
    (edited / "a2ats_config.json").write_text(json.dumps(config))
    with pytest.raises(A2atsError, match="budget must be"):
        load_converted(edited)
