"""Haystack text for the long-context tasks: built-in noise sentences or a user's text file, cut at sentences."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from ..errors import DataError

NOISE_TEXT = (
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
)


class Haystack:
    """Sentences with cached token counts, so a prompt can be filled to a token length without re-tokenizing."""

    def __init__(self, text: str, tokenizer: Any):
        sentences = [s.strip() for s in re.split(r"(?<=[.!?])\s+|\n{2,}", text) if s.strip()]
        if not sentences:
            raise DataError("the haystack text is empty")
        self.sentences = sentences
        self.lengths = [len(tokenizer(" " + s, add_special_tokens=False)["input_ids"]) for s in sentences]

    @classmethod
    def noise(cls, tokenizer: Any) -> Haystack:
        return cls(NOISE_TEXT, tokenizer)

    @classmethod
    def from_file(cls, path: str | Path, tokenizer: Any) -> Haystack:
        p = Path(path)
        if not p.is_file():
            raise DataError(f"haystack file {p} does not exist")
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise DataError(f"haystack file {p} is not UTF-8 text") from None
        return cls(text, tokenizer)

    def fill(self, n_tokens: int, offset: int = 0) -> list[str]:
        """Consecutive sentences (cycling from ``offset``) totalling about ``n_tokens`` tokens (never more)."""
        out: list[str] = []
        total, i = 0, offset % len(self.sentences)
        while True:
            n = self.lengths[i]
            if total + n > n_tokens:
                return out
            out.append(self.sentences[i])
            total += n
            i = (i + 1) % len(self.sentences)
