"""The converted checkpoint: ``a2ats_codebooks.safetensors`` and a versioned ``a2ats_config.json``.

The model's own files (config, tokenizer, weights or a reference to them) sit beside these two. The
config is written last, so a directory without it never loads. See ``docs/artifact-format.md``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..errors import ArtifactError
from ..io import open_safetensors, read_json, write_json, write_safetensors
from ..models import Geometry
from ..rope import DistanceBuckets
from ..runtime.settings import RuntimeSettings

SCHEMA = "a2ats.checkpoint"
SCHEMA_VERSION = 1
CONFIG_FILE = "a2ats_config.json"
CODEBOOKS_FILE = "a2ats_codebooks.safetensors"


def codebook_key(layer: int) -> str:
    return f"layers.{layer}.codebook"  # [Hkv, C, d] float32, pre-RoPE key space


def whitening_key(layer: int) -> str:
    return f"layers.{layer}.whitening"  # [Hkv, d, d] float32, L with H = L L^T (identity for plain VQ)


@dataclass
class A2atsConfig:
    """Retrieval settings and provenance of a converted checkpoint."""

    geometry: Geometry
    codebook_size: int
    whitening: str = "query_aware"  # or "plain"
    n_sink: int = RuntimeSettings.n_sink
    window: int = RuntimeSettings.window
    buckets: dict[str, Any] = field(default_factory=RuntimeSettings.buckets.to_config)
    budget: float | int = RuntimeSettings.budget
    aggregation: str = RuntimeSettings.aggregation
    rerank: float = RuntimeSettings.rerank
    dense_layers: list[int] = field(default_factory=list)  # layers that decode densely (optional; default none)
    retrieval_layers: list[int] | None = None  # layers with codebooks (the full-attention ones); None: every layer
    seed: int = 0
    model: dict[str, Any] = field(default_factory=dict)  # {"source": ModelSource dict, "weights": "copied"|"referenced"}
    calibration: dict[str, Any] = field(default_factory=dict)  # path and summary of the calibration manifest
    extra: dict[str, Any] = field(default_factory=dict)

    def distance_buckets(self) -> DistanceBuckets:
        return DistanceBuckets.from_config(self.buckets)

    def layers_with_codebooks(self) -> list[int]:
        """``retrieval_layers``, or every layer for a config written without the field."""
        if self.retrieval_layers is None:
            return list(range(self.geometry.num_layers))
        return [int(i) for i in self.retrieval_layers]

    def model_name(self) -> str:
        """The converted model's display name (its ``model_type`` for a config written without one)."""
        return (self.model.get("source") or {}).get("display_name") or self.geometry.model_type

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["geometry"] = self.geometry.to_dict()
        return {"schema": SCHEMA, "schema_version": SCHEMA_VERSION, "tool_version": __version__, **data}

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "a2ats_config.json") -> A2atsConfig:
        if data.get("schema") != SCHEMA:
            raise ArtifactError(f"{where} is not an a2ats checkpoint config (schema {data.get('schema')!r})")
        if data.get("schema_version") != SCHEMA_VERSION:
            raise ArtifactError(
                f"{where} has schema version {data.get('schema_version')}; this tool reads version {SCHEMA_VERSION}"
            )
        fields = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        fields["geometry"] = Geometry.from_dict(data["geometry"])
        return cls(**fields)


def by_layer(tensors: Mapping[int, torch.Tensor] | Sequence[torch.Tensor]) -> dict[int, torch.Tensor]:
    """Per-layer tensors keyed by layer index (a sequence holds every layer, in order)."""
    return dict(tensors) if isinstance(tensors, Mapping) else dict(enumerate(tensors))


def write_codebooks(
    directory: str | Path,
    codebooks: Mapping[int, torch.Tensor] | Sequence[torch.Tensor],
    whitening: Mapping[int, torch.Tensor] | Sequence[torch.Tensor],
) -> None:
    """Atomically write each retrieved layer's codebook ``[Hkv, C, d]`` and whitening factor ``[Hkv, d, d]``
    (float32), keyed by layer index (a sequence: every layer)."""
    codebooks, whitening = by_layer(codebooks), by_layer(whitening)
    if codebooks.keys() != whitening.keys():
        raise ValueError("codebooks and whitening factors name different layers")
    tensors: dict[str, torch.Tensor] = {}
    for i in sorted(codebooks):
        tensors[codebook_key(i)] = codebooks[i].float()
        tensors[whitening_key(i)] = whitening[i].float()
    write_safetensors(Path(directory) / CODEBOOKS_FILE, tensors, {"format": "pt", "schema": SCHEMA})


def write_config(directory: str | Path, config: A2atsConfig) -> None:
    """Atomically write ``a2ats_config.json`` (call last)."""
    write_json(Path(directory) / CONFIG_FILE, config.to_dict())


def is_converted(directory: str | Path) -> bool:
    return (Path(directory) / CONFIG_FILE).is_file()


def read_config(directory: str | Path) -> A2atsConfig:
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise ArtifactError(f"{directory} has no {CONFIG_FILE}: not a converted checkpoint, or an interrupted run")
    return A2atsConfig.from_dict(read_json(path), where=str(path))


def read_codebooks(
    directory: str | Path, config: A2atsConfig
) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """``(codebooks, whitening)`` of every retrieved layer, keyed by layer index, checked against the config."""
    path = Path(directory) / CODEBOOKS_FILE
    if not path.is_file():
        raise ArtifactError(f"{directory} has no {CODEBOOKS_FILE}")
    geo = config.geometry
    codebooks: dict[int, torch.Tensor] = {}
    factors: dict[int, torch.Tensor] = {}
    with open_safetensors(path) as f:
        names = set(f.keys())
        for i in config.layers_with_codebooks():
            if codebook_key(i) not in names or whitening_key(i) not in names:
                raise ArtifactError(f"{path} lacks the tensors of layer {i}")
            cb, wf = f.get_tensor(codebook_key(i)), f.get_tensor(whitening_key(i))
            want_cb = (geo.num_kv_heads, config.codebook_size, geo.head_dim)
            if tuple(cb.shape) != want_cb or tuple(wf.shape) != (geo.num_kv_heads, geo.head_dim, geo.head_dim):
                raise ArtifactError(
                    f"{path}: layer {i} codebook has shape {tuple(cb.shape)}, expected {want_cb} from the config"
                )
            codebooks[i], factors[i] = cb, wf
    return codebooks, factors
