"""Query-aware vector quantization of pre-RoPE keys: whitening, batched k-means, conversion and its report."""

from __future__ import annotations

from .convert import convert

__all__ = ["convert"]
