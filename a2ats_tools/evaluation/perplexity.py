"""Perplexity in decode mode: prefill a prefix, then feed the last tokens one at a time through the decode path
(where retrieval attention acts), scoring each next token. Dense and converted models run the same code."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from ..compat import cache_kwargs, output_cache
from ..errors import DataError


@torch.no_grad()
def decode_nll(
    model: Any,
    ids: list[int],
    n_decode: int,
    make_cache: Callable[[], Any] | None = None,
    progress: Callable[[], None] | None = None,
    prefilled: Any = None,
) -> list[float]:
    """Negative log-likelihoods of the last ``n_decode`` tokens of ``ids``, each predicted in a decode step.

    The prefix ``ids[:-n_decode-1]`` is prefilled in one pass; then ``ids[-n_decode-1:-1]`` are fed one token per
    step, and step ``i``'s logits score ``ids[-n_decode+i]``. ``make_cache`` builds the KV cache (None: the
    model's default, e.g. a DynamicCache for a dense model). ``prefilled``: a cache that already holds the prefix
    (shared with other configurations); the prefix pass is then skipped.
    """
    if n_decode < 1 or len(ids) < n_decode + 2:
        raise DataError(f"decode perplexity needs more than {n_decode + 1} tokens, the text has {len(ids)}")
    device = next(model.parameters()).device
    prefix = torch.tensor([ids[: -n_decode - 1]], device=device)
    if prefilled is not None:
        if prefilled.get_seq_length() != prefix.shape[1]:
            raise DataError(f"the prefilled cache holds {prefilled.get_seq_length()} tokens, the prefix {prefix.shape[1]}")
        past = prefilled
    else:
        kwargs: dict[str, Any] = {"use_cache": True}
        if make_cache is not None:
            kwargs.update(cache_kwargs(make_cache()))
        past = output_cache(model(input_ids=prefix, logits_to_keep=1, **kwargs))
    nll: list[float] = []
    feed = ids[-n_decode - 1 : -1]
    targets = ids[-n_decode:]
    for step, (token, target) in enumerate(zip(feed, targets, strict=True)):
        position = len(ids) - n_decode - 1 + step
        out = model(
            input_ids=torch.tensor([[token]], device=device),
            **cache_kwargs(past),
            use_cache=True,
            cache_position=torch.tensor([position], device=device),
        )
        past = output_cache(out)
        logp = torch.log_softmax(out.logits[0, -1].float(), -1)
        nll.append(-float(logp[target]))
        if progress is not None:
            progress()
    return nll


def perplexity(nll: list[float]) -> float:
    return math.exp(sum(nll) / len(nll)) if nll else float("nan")
