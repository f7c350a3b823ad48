"""a2ats-tools: turn a Hugging Face RoPE language model into an A²ATS retrieval-attention checkpoint, and run it."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
