"""The dense cache a grid point starts from: a real chunked prefill, or a synthetic cache tiled from one
(:mod:`.synthetic`). Dense uses it as it is; retrieval contenders fill their own caches from it."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from ..compat import cache_kwargs

REAL = "real"


@dataclass
class Prefilled:
    """A dense ``cache`` of ``ids [B, T]`` (for a synthetic cache: the source prompt tiled as the cache is), the
    next tokens ``first [B, 1]``, the ``seconds`` it took and its ``kind``: ``real`` or ``synthetic(from N)``."""

    ids: torch.Tensor
    cache: Any
    first: torch.Tensor
    seconds: float
    kind: str = REAL
    source_tokens: int | None = None  # the real prefill's length (synthetic caches)

    @property
    def context(self) -> int:
        return self.ids.shape[1]


def prefill_tokens_per_chunk(batch: int) -> int:
    """Prefill chunk so a chunk's attention scores stay about 1 GiB per 8K of context (``batch * chunk <= 4096``)."""
    return max(128, 4096 // max(1, batch))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def real_prefill(model: Any, ids: torch.Tensor) -> Prefilled:
    """Chunked dense prefill of ``ids [B, T]`` into a fresh ``DynamicCache`` (the model must be in dense mode),
    timed."""
    from transformers import DynamicCache

    device = ids.device
    cache = DynamicCache(config=model.config)
    chunk = prefill_tokens_per_chunk(ids.shape[0])
    sync(device)
    t0 = time.perf_counter()
    for start in range(0, ids.shape[1], chunk):
        out = model(input_ids=ids[:, start : start + chunk], **cache_kwargs(cache), use_cache=True, logits_to_keep=1)
    sync(device)
    seconds = time.perf_counter() - t0
    return Prefilled(ids, cache, out.logits[:, -1].argmax(-1, keepdim=True), seconds)
