"""Prompt tokens for bench: real text (Python's documentation topics, the eval's held-out text), so the caches
that decode steps read hold the keys a real prompt gives (A²ATS's selection depends on them; random tokens
give flatter attention than text does)."""

from __future__ import annotations

import random
from typing import Any

import torch


def text_tokens(tokenizer: Any, seed: int) -> list[int]:
    """Every documentation topic shipped with Python, shuffled with ``seed``, as one token stream."""
    from ..calibration.sources import pydoc_texts

    texts = pydoc_texts()
    random.Random(seed).shuffle(texts)
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
    return ids


def prompt_ids(stream: list[int], batch: int, length: int) -> torch.Tensor:
    """``[batch, length]`` consecutive windows of ``stream``, one per sample (each a different passage), the
    stream read cyclically where ``batch * length`` exceeds it."""
    need = batch * length
    reps = -(-need // len(stream))
    flat = torch.tensor((stream * reps)[:need], dtype=torch.long)
    return flat.view(batch, length)
