"""Bad input through the ``a2ats`` command line: every case exits with its code and one line (never a
traceback), and leaves nothing on disk that loads as valid; a previous good output stays byte for byte.

Cases run in process through :func:`a2ats_tools.cli.main`; only the Ctrl-C tests that send a real SIGINT
start a subprocess.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from a2ats_tools.calibration.format import CalibrationSet, layer_file
from a2ats_tools.defaults import MIN_TOKENS
from a2ats_tools.errors import A2atsError

from .conftest import build_tiny_model
from .test_convert import make_calibration
from .test_runtime import make_checkpoint

JUNK_MARK = ".a2ats-"  # partial directories, lock files and set-aside outputs all carry it
CLI_ERROR = 2
INTERRUPTED = 130


@dataclass
class Outcome:
    code: int | None
    err: str

    def one_line(self) -> str:
        """The single stderr line (asserting there is exactly one and no traceback)."""
        lines = [line for line in self.err.splitlines() if line.strip()]
        assert "Traceback" not in self.err and len(lines) == 1, self.err
        return lines[0]


def run_cli(monkeypatch, capsys, *args: str | Path) -> Outcome:
    """``a2ats ARGS`` in process; an escaping exception counts as a traceback."""
    from a2ats_tools.cli import main

    monkeypatch.setattr(sys, "argv", ["a2ats", *map(str, args)])
    monkeypatch.delenv("A2ATS_DEBUG", raising=False)
    code: int | None = 0
    try:
        main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 1
    except BaseException as exc:  # noqa: BLE001 - a traceback is exactly what the tests look for
        return Outcome(None, f"Traceback (escaped): {type(exc).__name__}: {exc}")
    return Outcome(code, capsys.readouterr().err)


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (hidden ones too), relative path → bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def junk(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob(f"*{JUNK_MARK}*"))


# --- inputs ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_model_dirs, tokenizer) -> dict[str, Path]:
    """Good and bad models, calibrations, checkpoints and data (built once; tests copy what they change)."""
    root = tmp_path_factory.mktemp("bad inputs ü")
    llama = tiny_model_dirs["llama"]
    paths = {"llama": llama}

    def model_dir(name: str, model) -> Path:
        path = root / name
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        return path

    from transformers import GPT2Config, GPT2LMHeadModel

    paths["gpt2"] = model_dir("gpt2", GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=32, vocab_size=49152)))
    paths["llama3"] = model_dir("llama3", build_tiny_model("llama", num_hidden_layers=3))
    pickled = Path(shutil.copytree(llama, root / "pickled"))
    (pickled / "model.safetensors").unlink()
    torch.save(build_tiny_model("llama").state_dict(), pickled / "pytorch_model.bin")
    paths["pickled"] = pickled
    remote = Path(shutil.copytree(llama, root / "remote code"))
    config = json.loads((remote / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (remote / "config.json").write_text(json.dumps(config))
    (remote / "modeling_evil.py").write_text("from pathlib import Path\nPath(__file__).with_name('RAN').touch()\n")
    paths["remote"] = remote
    paths["remote-only"] = edited_copy(remote, root / "remote only", set_json("config.json", model_type="evil"))

    paths["calib"] = make_calibration(root / "calib", build_tiny_model("llama"), llama, keys_per_head=128)
    paths["calib4"] = make_calibration(root / "calib4", build_tiny_model("llama", num_hidden_layers=4), llama,
                                       keys_per_head=64)
    paths["ckpt"] = make_checkpoint(build_tiny_model("llama"), root / "ckpt", tokenizer, codebook_size=16)
    paths["ckpt128"] = make_checkpoint(build_tiny_model("llama", max_position_embeddings=128), root / "ckpt128",
                                       tokenizer, codebook_size=16)
    corpus = root / "corpus ü.txt"
    corpus.write_text(" ".join(f"Sentence {i} is about item {i * 7 % 13}." for i in range(1000)))
    paths["corpus"] = corpus
    (root / "empty.txt").write_text("")
    paths["empty"] = root / "empty.txt"
    (root / "binary.txt").write_bytes(bytes(range(256)) * 8)
    paths["binary"] = root / "binary.txt"
    (root / "broken.parquet").write_bytes(b"PAR1 not really parquet")
    paths["parquet"] = root / "broken.parquet"
    (root / "broken.jsonl").write_text('{"text": "fine"}\n{"text": \n')
    paths["jsonl"] = root / "broken.jsonl"
    (root / "few.txt").write_text("Only a few words here.")
    paths["few"] = root / "few.txt"
    (root / "a file").write_text("in the way")
    paths["file"] = root / "a file"
    return paths


def edited_copy(src: Path, dst: Path, edit: Callable[[Path], None]) -> Path:
    shutil.copytree(src, dst)
    edit(dst)
    return dst


def set_json(name: str, **fields) -> Callable[[Path], None]:
    def edit(directory: Path) -> None:
        data = json.loads((directory / name).read_text())
        data.update(fields)
        (directory / name).write_text(json.dumps(data))

    return edit


def truncate(name: str) -> Callable[[Path], None]:
    def edit(directory: Path) -> None:
        path = directory / name
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])

    return edit


def nan_keys(layer: int) -> Callable[[Path], None]:
    def edit(directory: Path) -> None:
        from safetensors.torch import load_file, save_file

        path = directory / layer_file(layer)
        tensors = load_file(path)
        tensors["keys"][1, 5, 3] = float("nan")
        save_file(tensors, path)

    return edit


# --- the matrix --------------------------------------------------------------------------------------------

TINY_CONVERT = ("--codes", "16", "--iters", "2", "--no-compare-plain", "--light", "--quiet")


def calibrate_args(model: Path, source: Path, out: Path, *extra: str) -> list:
    return ["calibrate", "--model", model, "--recipe", "none", "--source", f"{source}={MIN_TOKENS}", "--positions", "2048",
            "--max-length", "128", "--chunk-size", "64", "--out", out, "--quiet", *extra]


@dataclass(frozen=True)
class Case:
    """One bad input: the command's arguments (from the inputs, a scratch folder and the output), and the
    words its one-line error must hold."""

    args: Callable[[dict[str, Path], Path, Path], list]
    words: tuple[str, ...]
    output: str = "calib"  # which good output is at --out beforehand: "calib", "ckpt" or "" for none


CASES = {
    # calibrate
    "calibrate: missing model": Case(
        lambda p, t, o: calibrate_args(t / "no such model", p["corpus"], o, "--overwrite"), ("does not exist",)),
    "calibrate: non-RoPE model": Case(
        lambda p, t, o: calibrate_args(p["gpt2"], p["corpus"], o, "--overwrite"), ("rotary", "RoPE")),
    "calibrate: pickled weights": Case(
        lambda p, t, o: calibrate_args(p["pickled"], p["corpus"], o, "--overwrite"), ("safetensors", "GGUF")),
    "calibrate: auto_map to an unknown architecture": Case(
        lambda p, t, o: calibrate_args(p["remote-only"], p["corpus"], o, "--overwrite"), ("could not load model",)),
    "calibrate: empty source": Case(
        lambda p, t, o: calibrate_args(p["llama"], p["empty"], o, "--overwrite"), ("empty",)),
    "calibrate: binary source": Case(
        lambda p, t, o: calibrate_args(p["llama"], p["binary"], o, "--overwrite"), ("not UTF-8",)),
    "calibrate: corrupt parquet": Case(
        lambda p, t, o: calibrate_args(p["llama"], p["parquet"], o, "--overwrite"), ("cannot read",)),
    "calibrate: corrupt jsonl": Case(
        lambda p, t, o: calibrate_args(p["llama"], p["jsonl"], o, "--overwrite"), ("not valid JSON",)),
    "calibrate: missing source": Case(
        lambda p, t, o: calibrate_args(p["llama"], t / "nothing here.txt", o, "--overwrite"), ("does not exist",)),
    "calibrate: too few tokens": Case(
        lambda p, t, o: calibrate_args(p["llama"], p["few"], o, "--overwrite"), (f"{MIN_TOKENS:,}", "--allow-few-tokens")),
    "calibrate: out under a file": Case(
        lambda p, t, o: calibrate_args(p["llama"], p["corpus"], p["file"] / "calib"), ("cannot create", "a file"), ""),
    "calibrate: out not writable": Case(
        lambda p, t, o: calibrate_args(p["llama"], p["corpus"], Path("/proc/a2ats/calib")), ("cannot create",), ""),
    "calibrate: out exists": Case(
        lambda p, t, o: calibrate_args(p["llama"], p["corpus"], o), ("--overwrite",)),
    # convert
    "convert: missing calibration": Case(
        lambda p, t, o: ["convert", t / "no calib", "--out", o, "--overwrite", *TINY_CONVERT], ("does not exist",),
        "ckpt"),
    "convert: not a calibration": Case(
        lambda p, t, o: ["convert", p["ckpt"], "--out", o, "--overwrite", *TINY_CONVERT], ("manifest.json",), "ckpt"),
    "convert: calibration schema version": Case(
        lambda p, t, o: ["convert", edited_copy(p["calib"], t / "c", set_json("manifest.json", schema_version=99)),
                         "--out", o, "--overwrite", *TINY_CONVERT], ("schema version 99",), "ckpt"),
    "convert: truncated calibration layer": Case(
        lambda p, t, o: ["convert", edited_copy(p["calib"], t / "c", truncate(layer_file(1))), "--out", o,
                         "--overwrite", *TINY_CONVERT], (layer_file(1), "truncated or corrupt"), "ckpt"),
    "convert: NaN keys in layer 3": Case(
        lambda p, t, o: ["convert", edited_copy(p["calib4"], t / "c", nan_keys(3)), "--out", o, "--overwrite",
                         *TINY_CONVERT], ("layer 3", "NaN"), "ckpt"),
    "convert: mismatched geometry": Case(
        lambda p, t, o: ["convert", p["calib"], "--model", p["llama3"], "--out", o, "--overwrite", *TINY_CONVERT],
        ("num_layers is 3",), "ckpt"),
    "convert: too few keys": Case(
        lambda p, t, o: ["convert", p["calib"], "--out", o, "--overwrite", "--codes", "4096", "--quiet"],
        ("only 128 calibration keys",), "ckpt"),
    "convert: out under a file": Case(
        lambda p, t, o: ["convert", p["calib"], "--out", p["file"] / "ckpt", *TINY_CONVERT], ("cannot create",), ""),
    "convert: out exists": Case(
        lambda p, t, o: ["convert", p["calib"], "--out", o, *TINY_CONVERT], ("--overwrite",), "ckpt"),
    # generate
    "generate: empty prompt": Case(lambda p, t, o: ["generate", p["ckpt"], "--prompt", ""], ("prompt is empty",), ""),
    "generate: empty prompt file": Case(
        lambda p, t, o: ["generate", p["ckpt"], "--prompt-file", p["empty"]], ("prompt is empty",), ""),
    "generate: prompt longer than the context": Case(
        lambda p, t, o: ["generate", p["ckpt128"], "--prompt-file", p["corpus"]], ("exceeds the model's context",), ""),
    "generate: missing checkpoint": Case(lambda p, t, o: ["generate", t / "no ckpt", "-p", "hi"], ("no ckpt",), ""),
    "generate: checkpoint schema version": Case(
        lambda p, t, o: ["generate", edited_copy(p["ckpt"], t / "k", set_json("a2ats_config.json", schema_version=7)),
                         "-p", "hi"], ("schema version 7",), ""),
    "generate: truncated codebooks": Case(
        lambda p, t, o: ["generate", edited_copy(p["ckpt"], t / "k", truncate("a2ats_codebooks.safetensors")), "-p",
                         "hi"], ("a2ats_codebooks.safetensors", "truncated or corrupt"), ""),
    "generate: mismatched geometry": Case(
        lambda p, t, o: ["generate", edited_copy(p["ckpt"], t / "k", set_json(
            "a2ats_config.json", geometry={**json.loads((p["ckpt"] / "a2ats_config.json").read_text())["geometry"],
                                            "num_layers": 5})), "-p", "hi"], ("layers [0, 1, 2, 3, 4]", "full-attention layers are [0, 1]"), ""),
    # eval and bench
    "eval: out under a file": Case(
        lambda p, t, o: ["eval", p["ckpt"], "--out", p["file"] / "eval", "--stages", "recall", "-q"],
        ("cannot create",), ""),
    "bench: out under a file": Case(
        lambda p, t, o: ["bench", p["ckpt"], "--out", p["file"] / "bench", "-q"], ("cannot create",), ""),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input(name, inputs, tmp_path, monkeypatch, capsys):
    case = CASES[name]
    out = tmp_path / "out put ü"
    if case.output == "calib":
        shutil.copytree(inputs["calib"], out)
    elif case.output == "ckpt":
        shutil.copytree(inputs["ckpt"], out)
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    args = case.args(inputs, scratch, out)
    before = snapshot(tmp_path)
    outcome = run_cli(monkeypatch, capsys, *args)
    line = outcome.one_line()
    assert outcome.code == CLI_ERROR and line.startswith("error:"), line
    for word in case.words:
        assert word in line, line
    assert snapshot(tmp_path) == before and junk(tmp_path) == []


@pytest.mark.parametrize("command", ["calibrate", "convert"])
def test_an_uncreatable_out_fails_before_the_model_loads(command, inputs, monkeypatch, capsys):
    import importlib

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before --out was checked")

    for module in ("a2ats_tools.calibration.run", "a2ats_tools.quantization.convert"):
        monkeypatch.setattr(importlib.import_module(module), "load_model", no_loading)
    out = inputs["file"] / "out"
    args = (calibrate_args(inputs["llama"], inputs["corpus"], out) if command == "calibrate"
            else ["convert", inputs["calib"], "--out", out, *TINY_CONVERT])
    outcome = run_cli(monkeypatch, capsys, *args)
    assert outcome.code == CLI_ERROR and "cannot create" in outcome.one_line()


# --- what already works, and what the flags allow ----------------------------------------------------------


def test_paths_with_spaces_and_non_ascii_run_end_to_end(inputs, tmp_path, monkeypatch, capsys):
    calib, ckpt = tmp_path / "calib dir ü" / "ça libré", tmp_path / "ckpt dir ü" / "日本"
    args = calibrate_args(inputs["llama"], inputs["corpus"], calib, "--tokens", str(MIN_TOKENS))
    outcome = run_cli(monkeypatch, capsys, *args)
    assert outcome.code == 0, outcome.err
    assert CalibrationSet(calib).manifest["tokens"]["total"] == MIN_TOKENS
    outcome = run_cli(monkeypatch, capsys, "convert", calib, "--out", ckpt, *TINY_CONVERT)
    assert outcome.code == 0, outcome.err
    outcome = run_cli(monkeypatch, capsys, "generate", ckpt, "-p", "Grüße aus Köln", "-n", "2", "-q")
    assert outcome.code == 0, outcome.err
    assert junk(tmp_path) == []


def test_auto_map_never_runs_the_models_own_code(inputs, tmp_path, monkeypatch, capsys):
    """A config's ``auto_map`` is ignored: the built-in architecture of its model_type loads, the model
    folder's Python file never runs."""
    out = tmp_path / "calib"
    outcome = run_cli(monkeypatch, capsys, *calibrate_args(inputs["remote"], inputs["corpus"], out))
    assert outcome.code == 0, outcome.err
    assert CalibrationSet(out).num_layers == 2 and not (inputs["remote"] / "RAN").exists()


def test_few_tokens_pass_only_with_the_flag(inputs, tmp_path, monkeypatch, capsys):
    out = tmp_path / "calib"
    outcome = run_cli(monkeypatch, capsys, *calibrate_args(inputs["llama"], inputs["few"], out, "--allow-few-tokens"))
    assert outcome.code == 0, outcome.err
    assert "--allow-few-tokens" in outcome.err  # still said, as a warning
    assert 0 < CalibrationSet(out).manifest["tokens"]["total"] < MIN_TOKENS


@pytest.mark.parametrize("overrides", [{"n_sink": -1}, {"window": -4}, {"window": 0}])
def test_negative_sinks_or_window_are_refused(inputs, overrides):
    from a2ats_tools import load_converted

    with pytest.raises(A2atsError, match="n_sink must be >= 0 and window >= 1") as err:
        load_converted(inputs["ckpt"], **overrides)
    assert "\n" not in str(err.value)


def test_an_empty_prompt_through_the_api_is_one_line(inputs):
    from a2ats_tools.evaluation.harness import ModelUnderTest

    mut = ModelUnderTest(inputs["ckpt"])
    with pytest.raises(A2atsError, match="prompt is empty") as err:
        mut.generate("", 4, [])
    assert "\n" not in str(err.value)


# --- Ctrl-C ------------------------------------------------------------------------------------------------


def raise_interrupt(*args, **kwargs):
    raise KeyboardInterrupt


INTERRUPT_POINTS = {
    # command → (module, attribute replaced by one that raises KeyboardInterrupt, what must survive)
    "calibrate while writing layers": ("a2ats_tools.calibration.accumulate", "write_layer", "calib"),
    "calibrate while capturing": ("a2ats_tools.calibration.run", "run_document", "calib"),
    "convert while training": ("a2ats_tools.quantization.convert", "two_level_kmeans", "ckpt"),
    "convert while writing the report": ("a2ats_tools.quantization.convert", "build_report", "ckpt"),
    "generate": ("a2ats_tools.runtime.loader", "load_converted", ""),
    "eval": ("a2ats_tools.evaluation.run", "run_recall", "eval"),
    "bench": ("a2ats_tools.bench.decode", "bench_point", "bench"),
}


def interrupted_args(name: str, inputs: dict[str, Path], out: Path) -> list:
    command = name.split()[0]
    if command == "calibrate":
        return calibrate_args(inputs["llama"], inputs["corpus"], out, "--overwrite", "--tokens", str(MIN_TOKENS))
    if command == "convert":
        return ["convert", inputs["calib"], "--out", out, "--overwrite", *TINY_CONVERT]
    if command == "generate":
        return ["generate", inputs["ckpt"], "-p", "hi"]
    if command == "eval":
        return ["eval", inputs["ckpt"], "--out", out, "--overwrite", "--stages", "recall", "-q"]
    return ["bench", inputs["ckpt"], "--out", out, "--overwrite", "--contexts", "64", "--steps", "2", "-q"]


@pytest.mark.parametrize("name", list(INTERRUPT_POINTS))
def test_ctrl_c_prints_one_line_and_keeps_the_previous_output(name, inputs, tmp_path, monkeypatch, capsys):
    import importlib

    module, attribute, previous = INTERRUPT_POINTS[name]
    out = tmp_path / "out"
    if previous in ("calib", "ckpt"):
        shutil.copytree(inputs[previous], out)
    elif previous:
        out.mkdir()
        (out / "results from before.json").write_text("{}")
    before = snapshot(tmp_path)
    monkeypatch.setattr(importlib.import_module(module), attribute, raise_interrupt)
    outcome = run_cli(monkeypatch, capsys, *interrupted_args(name, inputs, out))
    line = outcome.one_line()
    assert outcome.code == INTERRUPTED and line.startswith(f"interrupted: a2ats {name.split()[0]}"), line
    assert "nothing partial was kept" in line
    assert snapshot(tmp_path) == before and junk(tmp_path) == []


def _wait_for(predicate: Callable[[], bool], proc: subprocess.Popen, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline, "the run never reached the point to interrupt"
        time.sleep(0.05)


def sigint_when(args: list, ready: Callable[[], bool]) -> tuple[int, str]:
    """Start ``a2ats ARGS`` in a subprocess, send SIGINT once ``ready()``, return (exit code, stderr)."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    env.pop("A2ATS_DEBUG", None)
    # the child starts with Ctrl-C's default action, as from a shell, whatever this process inherited or set
    proc = subprocess.Popen([sys.executable, "-m", "a2ats_tools.cli", *map(str, args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        _wait_for(ready, proc)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, err


def partial_of(out: Path, child: str = "") -> Callable[[], bool]:
    """True once ``out``'s partial directory (holding ``child``, if given) exists."""
    return lambda: any((p / child).exists() for p in out.parent.glob(f".{out.name}.a2ats-partial-*"))


def test_sigint_during_calibration_capture(inputs, tmp_path):
    out = tmp_path / "calib ü"
    shutil.copytree(inputs["calib"], out)
    before = snapshot(tmp_path)
    args = calibrate_args(inputs["llama"], inputs["corpus"], out, "--overwrite", "--tokens", "8000")
    code, err = sigint_when(args, partial_of(out, ".shards"))
    assert code == INTERRUPTED, err
    assert Outcome(code, err).one_line().startswith("interrupted: a2ats calibrate")
    assert snapshot(tmp_path) == before and junk(tmp_path) == []


def test_sigint_during_codebook_training(inputs, tmp_path):
    out = tmp_path / "ckpt"
    calib = make_calibration(tmp_path / "big calib", build_tiny_model("llama"), inputs["llama"], keys_per_head=20000)
    before = snapshot(tmp_path)
    args = ["convert", calib, "--out", out, "--codes", "4096", "--iters", "100", "--tol", "0", "--algorithm", "lloyd",
            "--quiet"]
    code, err = sigint_when(args, partial_of(out))
    assert code == INTERRUPTED, err
    assert Outcome(code, err).one_line().startswith("interrupted: a2ats convert")
    assert snapshot(tmp_path) == before and junk(tmp_path) == [] and not out.exists()
