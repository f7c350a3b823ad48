"""The model's own files inside a converted checkpoint, and the geometry check the runtime calls at load.

A full checkpoint holds the weights (safetensors), ``config.json`` with an ``a2ats`` ``quantization_config``
entry, and the tokenizer, so ``AutoModelForCausalLM.from_pretrained(dir)`` finds everything in one place.
A light checkpoint (``--light``) holds only the tokenizer; the weights stay where ``a2ats_config.json``'s
``model.source`` points (``config.json`` is left out on purpose: its presence means "weights are here").
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import ArtifactError
from ..io import atomic_path, open_safetensors
from ..models import geometry
from .checkpoint import CONFIG_FILE, A2atsConfig

QUANT_METHOD = "a2ats"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"


def quantization_entry() -> dict[str, Any]:
    """The ``quantization_config`` written into the checkpoint's config.json."""
    return {"quant_method": QUANT_METHOD, "config_file": CONFIG_FILE}


def write_model_files(model: nn.Module, tokenizer: Any, directory: str | Path, *, light: bool = False) -> str:
    """Save the tokenizer and, unless ``light``, the weights and config.json; returns "copied" or "referenced".

    A GGUF-loaded model is saved dequantized: its gguf ``quantization_config`` is dropped first.
    """
    directory = Path(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    if light:
        return "referenced"
    config = model.config
    saved_quant = getattr(config, "quantization_config", None)
    had_quant = hasattr(config, "quantization_config")
    quantizer = getattr(model, "hf_quantizer", None)
    if had_quant:
        delattr(config, "quantization_config")
    if quantizer is not None:  # GGUF weights are already dequantized in memory; save them as plain tensors
        model.hf_quantizer = None
    try:
        model.save_pretrained(directory, safe_serialization=True)
    finally:
        if had_quant:
            config.quantization_config = saved_quant
        if quantizer is not None:
            model.hf_quantizer = quantizer
    set_quantization_entry(directory / "config.json")
    write_weights_index(directory)
    return "copied"


def write_weights_index(directory: str | Path) -> None:
    """``model.safetensors.index.json`` for a single-file save, naming every weight's file: loaders that read
    every ``*.safetensors`` of a directory without an index (vLLM) would take the codebooks file for weights.
    A sharded save has its index already."""
    directory = Path(directory)
    single, index = directory / WEIGHTS_FILE, directory / WEIGHTS_INDEX
    if index.exists() or not single.is_file():
        return
    with open_safetensors(single) as f:
        names = sorted(f.keys())
    data = {"metadata": {"total_size": tensor_bytes(single)}, "weight_map": {name: WEIGHTS_FILE for name in names}}
    with atomic_path(index) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n")


def tensor_bytes(path: Path) -> int:
    """Bytes of tensor data in a safetensors file: the file less its 8-byte length prefix and JSON header."""
    with open(path, "rb") as f:
        header = int.from_bytes(f.read(8), "little")
    return path.stat().st_size - 8 - header


def set_quantization_entry(config_json: str | Path) -> None:
    """Atomically write the ``a2ats`` ``quantization_config`` entry into a saved config.json."""
    config_json = Path(config_json)
    data = json.loads(config_json.read_text())
    data["quantization_config"] = quantization_entry()
    with atomic_path(config_json) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def check_geometry(config: A2atsConfig, model: nn.Module) -> None:
    """Raise :class:`ArtifactError` when ``model``'s attention shape differs from the checkpoint's."""
    problem = config.geometry.mismatch(geometry(model))
    if problem:
        raise ArtifactError(f"the checkpoint does not fit this model: {problem}")
