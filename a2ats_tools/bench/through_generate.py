"""Decode steps timed from outside, through ``model.generate``: what a user's generation loop costs per token
(the forward plus generate's own per-step work: logits processors, stopping checks, input and mask
preparation), beside bench's forward-only figure."""

from __future__ import annotations

import time
from typing import Any

import torch

from ..compat import cache_kwargs
from .prefill import sync


class StepClock:
    """A logits processor that only records when it is called: once per generated token, right after that
    step's forward, so consecutive calls are one generate step apart."""

    def __init__(self, device: torch.device):
        self.device = device
        self.times: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        sync(self.device)
        self.times.append(time.perf_counter())
        return scores


@torch.no_grad()
def generate_steps(
    model: Any, cache: Any, ids: torch.Tensor, steps: int, pad_token_id: int | None
) -> tuple[list[float], torch.Tensor]:
    """Greedy ``generate`` of ``steps + 1`` tokens continuing ``ids [B, n + 1]``, whose first ``n`` tokens
    ``cache`` holds (so generate's first forward is a decode step too). Returns the ``steps`` times between
    consecutive tokens and the new tokens ``[B, steps + 1]`` (the last not fed yet: the cache then holds
    ``n + steps + 1`` tokens)."""
    from transformers import LogitsProcessorList

    clock = StepClock(ids.device)
    new = steps + 1
    out = model.generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new, do_sample=False,
        logits_processor=LogitsProcessorList([clock]), pad_token_id=pad_token_id, **cache_kwargs(cache),
    )
    times = [b - a for a, b in zip(clock.times[:-1], clock.times[1:], strict=True)]
    return times, out[:, ids.shape[1] :]
