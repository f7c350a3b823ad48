"""Calibration recipes: readable TOML files listing the data sources, their token counts and the held-out set.

A recipe resolves by name (``default`` -> ``calib/default.toml`` in the repository) or by path. See
``docs/calibration.md`` for the format.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import tomllib

from ..errors import DataError
from .sources import SourceSpec

RECIPE_DIR = Path(__file__).resolve().parents[2] / "calib"
NO_RECIPE = "none"


@dataclass(frozen=True)
class HeldoutSpec:
    """Held-out sequences for convert's retrieval-quality report: ``sequences`` × ``length`` tokens from
    documents of ``source`` that are never used for training, with ``queries`` query positions each."""

    sequences: int = 2
    length: int = 4096
    queries: int = 64
    source: str | None = None  # a source name; None = the first source that is not ``uuid``

    def to_dict(self) -> dict[str, Any]:
        return {"sequences": self.sequences, "length": self.length, "queries": self.queries, "source": self.source}


@dataclass(frozen=True)
class Recipe:
    name: str
    sources: tuple[SourceSpec, ...]
    heldout: HeldoutSpec = field(default_factory=HeldoutSpec)
    max_length: int = 0  # 0 = the model's max_position_embeddings
    chunk_size: int = 8192
    path: str | None = None

    @property
    def total_tokens(self) -> int:
        return sum(s.tokens for s in self.sources)

    def scaled(self, total: int) -> Recipe:
        """The same mix with token counts scaled so that they sum to ``total``."""
        if total < 1:
            raise DataError(f"--tokens must be positive, got {total}")
        current = self.total_tokens
        if current == 0:
            raise DataError("cannot scale a recipe with no tokens; add a --source")
        sources = [replace(s, options=dict(s.options), tokens=round(s.tokens * total / current)) for s in self.sources]
        sources[-1].tokens += total - sum(s.tokens for s in sources)
        return replace(self, sources=tuple(sources))

    def with_sources(self, extra: list[SourceSpec]) -> Recipe:
        return replace(self, sources=self.sources + tuple(extra))

    def heldout_source(self) -> SourceSpec | None:
        """The source that supplies held-out documents (None when the recipe holds none out)."""
        if self.heldout.sequences == 0 or self.heldout.length == 0 or self.heldout.queries == 0:
            return None
        if self.heldout.source is not None:
            for s in self.sources:
                if s.label == self.heldout.source:
                    return s
            raise DataError(f"recipe {self.name}: held-out source {self.heldout.source!r} is not one of its sources")
        for s in self.sources:
            if s.kind != "uuid":
                return s
        return self.sources[0] if self.sources else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "path": self.path,
            "sources": [s.to_dict() for s in self.sources],
            "heldout": self.heldout.to_dict(),
            "max_length": self.max_length,
            "chunk_size": self.chunk_size,
        }


def _parse(data: dict[str, Any], name: str, path: str | None) -> Recipe:
    try:
        sources = []
        for entry in data.get("sources", []):
            entry = dict(entry)
            kind = entry.pop("kind")
            tokens = entry.pop("tokens")
            label = entry.pop("name", "")
            sources.append(SourceSpec(kind=kind, tokens=int(tokens), name=label, options=entry))
        held = dict(data.get("heldout", {}))
        heldout = HeldoutSpec(
            sequences=int(held.get("sequences", 2)),
            length=int(held.get("length", 4096)),
            queries=int(held.get("queries", 64)),
            source=held.get("source"),
        )
        return Recipe(
            name=str(data.get("name", name)),
            sources=tuple(sources),
            heldout=heldout,
            max_length=int(data.get("max_length", 0)),
            chunk_size=int(data.get("chunk_size", 8192)),
            path=path,
        )
    except KeyError as exc:
        raise DataError(f"recipe {name}: a source is missing the field {exc.args[0]!r}") from None
    except (TypeError, ValueError) as exc:
        raise DataError(f"recipe {name}: {exc}") from None


def available_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPE_DIR.glob("*.toml"))


def load_recipe(name_or_path: str) -> Recipe:
    """A recipe by name (in the repository's ``calib/``), by path, or ``none`` (no sources; add --source)."""
    if name_or_path.lower() == NO_RECIPE:
        return Recipe(name=NO_RECIPE, sources=())
    path = Path(name_or_path).expanduser()
    if not path.is_file():
        named = RECIPE_DIR / f"{name_or_path}.toml"
        if named.is_file():
            path = named
        else:
            known = ", ".join(available_recipes()) or "none found"
            raise DataError(f"recipe {name_or_path!r} is neither a file nor a known recipe name ({known})")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise DataError(f"recipe {path} is not valid TOML: {exc}") from None
    return _parse(data, path.stem, str(path))


def parse_source_option(value: str, default_tokens: int) -> SourceSpec:
    """``--source PATH`` or ``--source PATH=TOKENS``: a local files source."""
    path, tokens = value, default_tokens
    head, sep, tail = value.rpartition("=")
    if sep and tail.isdigit():
        path, tokens = head, int(tail)
    if not Path(path).expanduser().exists():
        raise DataError(f"--source {path} does not exist")
    return SourceSpec(kind="files", tokens=tokens, options={"path": path})
