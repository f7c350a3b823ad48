"""The calibration directory: a versioned ``manifest.json`` plus one safetensors file per layer.

See ``docs/artifact-format.md`` for the specification. The manifest is written last: a directory without
one is an interrupted run and never loads.
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..errors import ArtifactError
from ..io import open_safetensors, read_json, write_json, write_safetensors
from ..models import Geometry

SCHEMA = "a2ats.calibration"
SCHEMA_VERSION = 1
MANIFEST = "manifest.json"

# tensor names inside layer_XXX.safetensors
KEYS = "keys"  # [Hkv, N, d] float16: pre-RoPE keys (after any k-norm) of every training token
QUERY_MOMENT = "query_moment"  # [Hkv, d, d] float64: sum of q q^T over pre-RoPE queries of the group
WROPE_QUERY_MOMENT = "wrope_query_moment"  # [P, Hkv, d, d] float64: sum of q_w q_w^T at each relative position
QUERY_COUNT = "query_count"  # [Hkv] int64: number of query vectors summed into each moment
HELDOUT_KEYS = "heldout_keys"  # [S, Hkv, L, d] float32: pre-RoPE keys of held-out sequences
HELDOUT_QUERIES = "heldout_queries"  # [S, Hq, M, d] float32: pre-RoPE queries sampled from them
HELDOUT_POSITIONS = "heldout_query_positions"  # [S, M] int64: absolute positions of those queries


def layer_file(layer: int) -> str:
    return f"layer_{layer:03d}.safetensors"


@dataclass
class LayerStats:
    """Everything calibration recorded for one layer (tensors on CPU)."""

    keys: torch.Tensor
    query_moment: torch.Tensor
    wrope_query_moment: torch.Tensor
    query_count: torch.Tensor
    heldout_keys: torch.Tensor
    heldout_queries: torch.Tensor
    heldout_query_positions: torch.Tensor

    def to_tensors(self) -> dict[str, torch.Tensor]:
        return {
            KEYS: self.keys,
            QUERY_MOMENT: self.query_moment,
            WROPE_QUERY_MOMENT: self.wrope_query_moment,
            QUERY_COUNT: self.query_count,
            HELDOUT_KEYS: self.heldout_keys,
            HELDOUT_QUERIES: self.heldout_queries,
            HELDOUT_POSITIONS: self.heldout_query_positions,
        }


def write_layer(directory: str | Path, layer: int, stats: LayerStats) -> None:
    """Atomically write one layer's statistics."""
    write_safetensors(Path(directory) / layer_file(layer), stats.to_tensors(), {"layer": str(layer)})


def write_manifest(
    directory: str | Path,
    *,
    model: dict[str, Any],
    geometry: Geometry,
    relative_positions: list[int],
    tokens_by_source: dict[str, int],
    heldout: dict[str, int],
    key_dtype: str,
    recipe: dict[str, Any],
    seed: int,
    retrieval_layers: list[int] | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``manifest.json`` (call last, after every layer file exists). ``retrieval_layers``: the layers
    captured (the full-attention ones; default every layer)."""
    directory = Path(directory)
    kept = list(range(geometry.num_layers)) if retrieval_layers is None else [int(i) for i in retrieval_layers]
    layers = [layer_file(i) for i in kept]
    missing = [f for f in layers if not (directory / f).is_file()]
    if missing:
        raise ArtifactError(f"cannot finish {directory}: missing {missing[0]}")
    manifest = {
        "schema": SCHEMA,
        "schema_version": SCHEMA_VERSION,
        "tool_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "model": model,
        "geometry": geometry.to_dict(),
        "relative_positions": [int(p) for p in relative_positions],
        "tokens": {"total": int(sum(tokens_by_source.values())), "by_source": dict(tokens_by_source)},
        "heldout": dict(heldout),
        "key_dtype": key_dtype,
        "recipe": recipe,
        "seed": int(seed),
        "retrieval_layers": kept,
        "files": {"layers": layers},
        **(extra or {}),
    }
    write_json(directory / MANIFEST, manifest)
    return manifest


class CalibrationSet:
    """Read access to a finished calibration directory."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        manifest_path = self.path / MANIFEST
        if not self.path.is_dir():
            raise ArtifactError(f"calibration directory {self.path} does not exist")
        if not manifest_path.is_file():
            raise ArtifactError(f"{self.path} has no {MANIFEST}: not a calibration directory, or an interrupted run")
        self.manifest = read_json(manifest_path)
        if self.manifest.get("schema") != SCHEMA:
            raise ArtifactError(f"{manifest_path} is not an a2ats calibration manifest (schema {self.manifest.get('schema')!r})")
        version = self.manifest.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ArtifactError(f"{manifest_path} has schema version {version}; this tool reads version {SCHEMA_VERSION}")
        self.geometry = Geometry.from_dict(self.manifest["geometry"])
        for name in self.manifest["files"]["layers"]:
            if not (self.path / name).is_file():
                raise ArtifactError(f"{self.path} is incomplete: {name} is missing")

    @property
    def relative_positions(self) -> list[int]:
        return list(self.manifest["relative_positions"])

    @property
    def num_layers(self) -> int:
        return self.geometry.num_layers

    @property
    def retrieval_layers(self) -> list[int]:
        """The layers calibrated (full attention); a manifest without the field calibrated every layer."""
        return [int(i) for i in self.manifest.get("retrieval_layers", range(self.num_layers))]

    def tensor(self, layer: int, name: str) -> torch.Tensor:
        """One tensor of one layer, read without loading the rest of the file."""
        with open_safetensors(self.path / layer_file(layer)) as f:
            if name not in f.keys():
                raise ArtifactError(f"{layer_file(layer)} in {self.path} has no tensor {name!r}")
            return f.get_tensor(name)

    def layer(self, layer: int) -> LayerStats:
        """All statistics of one layer."""
        with open_safetensors(self.path / layer_file(layer)) as f:
            return LayerStats(**{name: f.get_tensor(name) for name in LayerStats.__dataclass_fields__})
