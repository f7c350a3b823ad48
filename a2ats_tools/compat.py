"""What differs between the transformers 5.x minors this package supports (see ``pyproject.toml``).

transformers 5.24 renamed the KV cache argument of ``forward`` and ``generate`` (and of every attention
module) from ``past_key_values`` to ``cache``, and the outputs' field likewise; the old names still work there
but warn. Calls made by this package go through :func:`cache_kwargs` / :func:`output_cache`, so they use
whichever name the installed version expects.

transformers 5.25 kernelizes every model ``from_pretrained`` loads (``use_kernels`` defaults to on, and the
``kernels`` package became a dependency): on CUDA its RMSNorm, activation and ``apply_rotary_pos_emb`` are
swapped for kernels fetched from the Hub at load time. This package loads the model's own code instead
(:data:`LOAD_KWARGS`): the RoPE layout it probes and the attention it hooks are the modeling code's, and loading
needs no network. 5.24 takes the same argument, off by default there.
"""

from __future__ import annotations

from typing import Any

import transformers
from packaging.version import Version  # a dependency of transformers

CACHE_KWARG = "cache" if Version(transformers.__version__).release >= (5, 24) else "past_key_values"
CACHE_KWARGS = ("cache", "past_key_values")  # either name, as callers may pass it


LOAD_KWARGS: dict[str, Any] = {"use_kernels": False}  # for from_pretrained: the modeling code as written


def cache_kwargs(cache: Any) -> dict[str, Any]:
    """``{name: cache}`` under the installed transformers' name for the cache argument."""
    return {CACHE_KWARG: cache}


def passed_cache(kwargs: dict[str, Any]) -> Any:
    """The cache a caller passed under either name (None if none)."""
    for name in CACHE_KWARGS:
        if kwargs.get(name) is not None:
            return kwargs[name]
    return None


def output_cache(output: Any) -> Any:
    """The cache a model's output carries, read under the installed version's field name."""
    return getattr(output, CACHE_KWARG)
