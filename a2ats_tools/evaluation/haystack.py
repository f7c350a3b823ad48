"""Haystack text for the long-context tasks, cut at sentences: built-in noise sentences (``noise``), Python's own
documentation (``pydoc``: real prose and code, shipped with every Python), or a user's text file."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from ..errors import DataError

NOISE_TEXT = (
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
)


BUILTIN = ("noise", "pydoc")
HAYSTACK_HELP = "noise (built-in repeated sentences), pydoc (Python's own documentation: real text), or a text file"


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
    def pydoc(cls, tokenizer: Any) -> Haystack:
        import pydoc_data.topics

        return cls("\n\n".join(pydoc_data.topics.topics.values()), tokenizer)

    @classmethod
    def named(cls, spec: str | Path | None, tokenizer: Any) -> Haystack:
        """``noise`` (also None), ``pydoc`` or a text file's path."""
        if spec is None or str(spec) == "noise":
            return cls.noise(tokenizer)
        if str(spec) == "pydoc":
            return cls.pydoc(tokenizer)
        return cls.from_file(spec, tokenizer)

    @staticmethod
    def check(spec: str | Path | None) -> None:
        """Refuse a haystack that is neither built in nor an existing file (before any model is loaded)."""
        if spec is not None and str(spec) not in BUILTIN and not Path(spec).is_file():
            raise DataError(f"haystack {spec} is neither {' nor '.join(BUILTIN)} nor an existing file")

    @staticmethod
    def describe(spec: str | Path | None) -> str:
        """How a result file records the haystack: ``builtin:NAME`` or the file's path."""
        if spec is None or str(spec) in BUILTIN:
            return f"builtin:{spec or 'noise'}"
        return str(spec)

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
