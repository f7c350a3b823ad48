"""Backend choice shared by the kernels: Triton on CUDA tensors, the torch reference everywhere else.

Triton is optional (it is a Linux-only dependency): when it cannot be imported, ``triton``/``tl`` are
``None``, the kernels are not defined and only the torch backend is available. Triton kernels also run on
CPU tensors under ``TRITON_INTERPRET=1`` (set before import), which is how the tests check them.
"""

from __future__ import annotations

import os
from typing import Literal

import torch

try:  # pragma: no cover - exercised implicitly
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - platforms without triton
    triton = None
    tl = None

Backend = Literal["auto", "torch", "triton"]
BACKENDS: tuple[str, ...] = ("auto", "torch", "triton")


def triton_available() -> bool:
    """Whether the Triton kernels are defined (triton importable)."""
    return triton is not None


def interpreting() -> bool:
    """Whether Triton runs in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve_backend(backend: str, *tensors: torch.Tensor) -> str:
    """``"torch"`` or ``"triton"`` for ``backend``: ``auto`` picks Triton when every tensor is on CUDA."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown kernel backend {backend!r}; choose from {BACKENDS}")
    if backend == "auto":
        on_cuda = all(t.is_cuda for t in tensors)
        return "triton" if on_cuda and triton_available() else "torch"
    if backend == "triton" and not triton_available():
        raise RuntimeError("the triton backend was requested but triton is not installed")
    if backend == "triton" and not interpreting() and not all(t.is_cuda for t in tensors):
        raise RuntimeError(
            "the triton backend needs CUDA tensors, but some are on the CPU (or set TRITON_INTERPRET=1, before "
            "import, for the CPU interpreter)"
        )
    return backend
