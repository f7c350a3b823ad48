"""Atomic writes: write to a temporary name in the same folder, fsync, then rename.

A directory artifact is complete only once its manifest exists, and the manifest is always written last,
so an interrupted run never leaves something that loads as valid.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from .errors import A2atsError


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_json(path: str | os.PathLike, data: Mapping[str, Any]) -> None:
    """Atomically write ``data`` as pretty JSON."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def write_safetensors(
    path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> None:
    """Atomically write a safetensors file (tensors made contiguous and moved to CPU)."""
    flat = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(flat, str(tmp), metadata=dict(metadata) if metadata else None)


def read_json(path: str | os.PathLike) -> dict[str, Any]:
    """Read a JSON file, turning a missing or corrupt file into a one-line error."""
    path = Path(path)
    if not path.is_file():
        raise A2atsError(f"{path} does not exist")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise A2atsError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno})") from None


def check_output_dir(path: str | os.PathLike, overwrite: bool, what: str = "output directory") -> bool:
    """Refuse an existing non-empty ``path`` unless ``overwrite`` (touches nothing); True if it must be replaced."""
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        if not overwrite:
            raise A2atsError(f"{what} {path} already exists; pass --overwrite to replace it")
        return True
    return False


def prepare_output_dir(path: str | os.PathLike, overwrite: bool, what: str = "output directory") -> Path:
    """Create an empty output directory; refuse an existing non-empty one unless ``overwrite``."""
    path = Path(path)
    if check_output_dir(path, overwrite, what):
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    path.mkdir(parents=True, exist_ok=True)
    return path
