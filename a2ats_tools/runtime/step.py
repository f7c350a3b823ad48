"""What the layers of one forward step share, owned by the cache that runs the step.

Every decoder layer of a decode step sees the same mask, the same rotary factors and the same cache length,
so what is derived from them (the mask's real rows, each sample's budget, the distance-bucket offsets, the
fused CPU kernel's argument plan) is computed by the first layer that needs it and reused by the others.
The cache starts a new :class:`StepContext` when layer 0 is updated: nothing derived in one step survives
into the next, and two caches decoding in one process never see each other's values.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any, TypeVar

T = TypeVar("T")


class StepContext:
    """Values computed once per step, each under a hashable ``key`` and tied to the objects it derives from."""

    def __init__(self) -> None:
        self._entries: dict[Hashable, tuple[tuple[Any, ...], Any]] = {}

    def shared(self, key: Hashable, compute: Callable[[], T], *sources: Any) -> T:
        """``compute()``, once per step for ``key`` and the same ``sources``.

        ``sources`` (tensors, usually) are compared by identity and kept referenced with the value, so an
        identity can never be recycled by a new object while the entry lives.
        """
        hit = self._entries.get(key)
        if hit is not None and len(hit[0]) == len(sources) and all(a is b for a, b in zip(hit[0], sources, strict=True)):
            return hit[1]
        value = compute()
        self._entries[key] = (sources, value)
        return value

    def __len__(self) -> int:
        return len(self._entries)
