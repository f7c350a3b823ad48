"""Streaming per-layer statistics: key shards on disk, float64 query moments and held-out samples in memory.

Keys are buffered per layer and flushed as fp16 shards (atomic safetensors files) to a temporary subfolder;
:meth:`StatsAccumulator.finish` merges them into one file per layer, one layer at a time, so peak memory does
not grow with the token count beyond one layer's keys.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors import safe_open

from ..io import write_safetensors
from ..models import Geometry
from ..rope import Rotary
from .format import LayerStats, write_layer

SHARD_DIR = ".shards"
KEY_DTYPE = torch.float16


class StatsAccumulator:
    """Receives pre-RoPE queries/keys of every layer (as a capture sink) and writes the calibration layers."""

    def __init__(self, directory: Path, geometry: Geometry, layers: list[int] | None = None, shard_tokens: int = 8192):
        """``layers``: the retrieved layers whose statistics are kept (default: every layer)."""
        self.directory = Path(directory)
        self.geometry = geometry
        self.layers = list(range(geometry.num_layers)) if layers is None else list(layers)
        self.shard_tokens = shard_tokens
        self.shard_dir = self.directory / SHARD_DIR
        self.shard_dir.mkdir(parents=True, exist_ok=True)
        g, d = geometry, geometry.head_dim
        self.query_moment = {i: torch.zeros(g.num_kv_heads, d, d, dtype=torch.float64) for i in self.layers}
        self.query_count = {i: torch.zeros(g.num_kv_heads, dtype=torch.int64) for i in self.layers}
        self._buffers: dict[int, list[torch.Tensor]] = {i: [] for i in self.layers}
        self._buffered = dict.fromkeys(self.layers, 0)
        self._shards = dict.fromkeys(self.layers, 0)
        self.heldout_keys: dict[int, list[torch.Tensor]] = {i: [] for i in self.layers}
        self.heldout_queries: dict[int, list[torch.Tensor]] = {i: [] for i in self.layers}
        self.heldout_positions: list[torch.Tensor] = []
        self._heldout_seq: dict[int, dict] | None = None
        self._heldout_positions = torch.zeros(0, dtype=torch.int64)

    # ------------------------------------------------------------ training tokens

    def training_sink(self, layer: int, queries: torch.Tensor, keys: torch.Tensor) -> None:
        """Capture sink for training text: add to the query moment and buffer the keys."""
        g = self.geometry
        b, hq, t, d = queries.shape
        q = queries.to("cpu", torch.float64).reshape(b, g.num_kv_heads, g.group_size, t, d)
        q = q.permute(1, 0, 2, 3, 4).reshape(g.num_kv_heads, -1, d)
        self.query_moment[layer] += torch.einsum("hnd,hne->hde", q, q)
        self.query_count[layer] += q.shape[1]
        k = keys.to("cpu").permute(1, 0, 2, 3).reshape(g.num_kv_heads, -1, d).to(KEY_DTYPE)
        self._buffers[layer].append(k)
        self._buffered[layer] += k.shape[1]
        if self._buffered[layer] >= self.shard_tokens:
            self._flush(layer)

    def _layer_shard_dir(self, layer: int) -> Path:
        return self.shard_dir / f"layer_{layer:03d}"

    def _flush(self, layer: int) -> None:
        if not self._buffers[layer]:
            return
        keys = torch.cat(self._buffers[layer], dim=1)
        path = self._layer_shard_dir(layer) / f"shard_{self._shards[layer]:05d}.safetensors"
        write_safetensors(path, {"keys": keys})
        self._shards[layer] += 1
        self._buffers[layer], self._buffered[layer] = [], 0

    # ------------------------------------------------------------ held-out sequences

    def begin_heldout(self, positions: torch.Tensor) -> None:
        """Start a held-out sequence whose queries are kept at ``positions`` (absolute, sorted)."""
        self._heldout_positions = positions.to("cpu", torch.int64)
        self._heldout_seq = {i: {"q": [], "k": [], "seen": 0} for i in self.layers}

    def heldout_sink(self, layer: int, queries: torch.Tensor, keys: torch.Tensor) -> None:
        """Capture sink for a held-out sequence: keep all its keys and the queries at the chosen positions."""
        assert self._heldout_seq is not None, "begin_heldout() first"
        state = self._heldout_seq[layer]
        start, t = state["seen"], queries.shape[2]
        local = self._heldout_positions[(self._heldout_positions >= start) & (self._heldout_positions < start + t)]
        state["q"].append(queries[0, :, local - start].to("cpu", torch.float32))
        state["k"].append(keys[0].to("cpu", torch.float32))
        state["seen"] = start + t

    def end_heldout(self) -> None:
        assert self._heldout_seq is not None
        for layer, parts in self._heldout_seq.items():
            self.heldout_keys[layer].append(torch.cat(parts["k"], dim=1))
            self.heldout_queries[layer].append(torch.cat(parts["q"], dim=1))
        self.heldout_positions.append(self._heldout_positions)
        self._heldout_seq = None

    # ------------------------------------------------------------ output

    def _merged_keys(self, layer: int) -> torch.Tensor:
        self._flush(layer)
        parts = []
        for path in sorted(self._layer_shard_dir(layer).glob("shard_*.safetensors")):
            with safe_open(str(path), framework="pt") as f:
                parts.append(f.get_tensor("keys"))
        if not parts:
            return torch.zeros(self.geometry.num_kv_heads, 0, self.geometry.head_dim, dtype=KEY_DTYPE)
        return torch.cat(parts, dim=1)

    def _heldout(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        g = self.geometry
        if not self.heldout_keys[layer]:
            return (
                torch.zeros(0, g.num_kv_heads, 0, g.head_dim),
                torch.zeros(0, g.num_heads, 0, g.head_dim),
                torch.zeros(0, 0, dtype=torch.int64),
            )
        return (
            torch.stack(self.heldout_keys[layer]),
            torch.stack(self.heldout_queries[layer]),
            torch.stack(self.heldout_positions),
        )

    def finish(self, rotary: Rotary, relative_positions: list[int]) -> None:
        """Write ``layer_XXX.safetensors`` for every kept layer (merging shards one layer at a time)."""
        matrices = torch.stack([rotary.matrix(p).cpu() for p in relative_positions])  # [P, d, d]
        for layer in self.layers:
            moment = self.query_moment[layer]
            wrope = torch.einsum("pij,hjk,pkl->phil", matrices.transpose(1, 2), moment, matrices)
            hk, hq, hp = self._heldout(layer)
            stats = LayerStats(
                keys=self._merged_keys(layer),
                query_moment=moment,
                wrope_query_moment=wrope,
                query_count=self.query_count[layer].clone(),
                heldout_keys=hk,
                heldout_queries=hq,
                heldout_query_positions=hp,
            )
            write_layer(self.directory, layer, stats)
            shutil.rmtree(self._layer_shard_dir(layer), ignore_errors=True)
            self.heldout_keys[layer], self.heldout_queries[layer] = [], []
        self.discard_shards()

    def discard_shards(self) -> None:
        shutil.rmtree(self.shard_dir, ignore_errors=True)
