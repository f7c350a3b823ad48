"""Token-selection strategies for decode steps, kvpress style: one small class per file on
:class:`~.base.TokenSelector`, registered by its ``name`` (``RuntimeSettings.selector`` picks one).

A selector keeps whatever per-token metadata it needs as keys enter the cache (``on_append``) and, at each
decode step, returns the rows each KV head attends to (``select``). A new selector is one file whose class
overrides ``scores`` (and the metadata hooks it needs), passed to :func:`register_selector`.
"""

from __future__ import annotations

from .a2ats import A2atsSelector
from .base import TokenSelector, candidate_logits, gather_rows
from .dense import DenseSelector
from .exact import ExactTopKSelector
from .quest import QuestSelector
from .streaming import StreamingSelector

SELECTOR_CLASSES: dict[str, type[TokenSelector]] = {
    cls.name: cls for cls in (A2atsSelector, StreamingSelector, ExactTopKSelector, QuestSelector, DenseSelector)
}


def register_selector(cls: type[TokenSelector]) -> type[TokenSelector]:
    """Make a selector available by its ``name`` (``a2ats generate --selector NAME``, ``load_converted(selector=...)``)."""
    SELECTOR_CLASSES[cls.name] = cls
    return cls


__all__ = [
    "SELECTOR_CLASSES", "A2atsSelector", "DenseSelector", "ExactTopKSelector", "QuestSelector", "StreamingSelector",
    "TokenSelector", "candidate_logits", "gather_rows", "register_selector",
]
