"""Rotary position embeddings as the model itself computes them, and WRoPE distance buckets.

All rotations go through the model's own rotary-embedding module (``rotary(x, position_ids) -> cos, sin``),
so every RoPE variant transformers implements (default, linear, llama3, yarn, ...) is served by one path.
The rotation convention is transformers' ``rotate_half`` one, used by every RoPE decoder it ships.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """Rotate the two halves of the last dimension: ``(x1, x2) -> (-x2, x1)``."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` by the angles encoded in ``cos``/``sin`` (broadcast against ``x``)."""
    return x * cos + rotate_half(x) * sin


def undo_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Invert :func:`apply_rope` exactly, including any attention scaling folded into ``cos``/``sin``."""
    scale2 = (cos * cos + sin * sin).clamp_min(1e-12)
    return (x * cos - rotate_half(x) * sin) / scale2


def undo_rope_keys(keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Cached keys ``[B, Hkv, n, d]`` back to pre-RoPE form (float32) with the factors ``[B or 1, n, d]`` that
    rotated them (the model's ``position_embeddings``, shared by the KV heads)."""
    return undo_rope(keys.float(), cos[:, None].float(), sin[:, None].float())


class Rotary:
    """One layer type's rotary embedding evaluated at arbitrary (relative) positions, in float32.

    Built from the module's own buffers, never re-derived from ``rope_theta``: its inverse frequencies
    (``{layer_type}_inv_freq`` where the module keeps one set per layer type, as Gemma 3 does, else ``inv_freq``)
    and its attention scaling (yarn's factor, longrope's), so every rope type transformers implements (default,
    linear, dynamic, yarn, longrope, llama3) is served by one path. Dynamic and longrope modules switch
    frequencies with the sequence length; this uses their native set (``original_inv_freq``), the one they use
    within ``max_position_embeddings``. The module's forward is not called, so its state never changes.
    """

    def __init__(self, module: nn.Module, head_dim: int, layer_type: str | None = None):
        self.module = module
        self.head_dim = head_dim
        self.layer_type = layer_type
        prefix = f"{layer_type}_" if layer_type and hasattr(module, f"{layer_type}_inv_freq") else ""
        inv_freq = getattr(module, f"{prefix}original_inv_freq", None)
        if inv_freq is None:
            inv_freq = getattr(module, f"{prefix}inv_freq")
        self.inv_freq = inv_freq.detach().float().cpu()
        self.attention_scaling = float(getattr(module, f"{prefix}attention_scaling", 1.0))
        if 2 * self.inv_freq.numel() != head_dim:
            raise ValueError(f"the rotary module rotates {2 * self.inv_freq.numel()} of {head_dim} dimensions")

    @torch.no_grad()
    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``positions`` of any shape -> ``cos, sin`` of shape ``[*positions.shape, head_dim]`` (float32), as the
        model's forward computes them (``cat(freqs, freqs)``, times the attention scaling)."""
        freqs = positions.to("cpu", torch.float32)[..., None] * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos() * self.attention_scaling, emb.sin() * self.attention_scaling
        return cos.to(positions.device), sin.to(positions.device)

    def matrix(self, distance: int | float) -> torch.Tensor:
        """The ``[head_dim, head_dim]`` matrix ``M`` with ``apply_rope(x) == x @ M`` at ``distance`` (float64)."""
        cos, sin = self.cos_sin(torch.tensor([int(round(distance))]))
        eye = torch.eye(self.head_dim, dtype=torch.float32)
        return apply_rope(eye, cos[0], sin[0]).double()

    def rotate_to(self, x: torch.Tensor, distances: torch.Tensor) -> torch.Tensor:
        """Rotate vectors ``x [..., d]`` to each of ``distances [P]`` -> ``[..., P, d]`` (float32)."""
        cos, sin = self.cos_sin(distances)
        return apply_rope(x.float().unsqueeze(-2), cos, sin)


BucketMode = Literal["single", "log"]
WROPE_DISTANCE = 2048  # the paper's single WRoPE scoring distance


@dataclass(frozen=True)
class DistanceBuckets:
    """How a query is rotated for approximate scoring (WRoPE).

    ``single``: the paper's WRoPE, every past token scored with the query rotated to one distance.
    ``log``: log-spaced buckets of relative distance starting at the local window; token ``j`` seen from step
    ``t`` is scored with the query rotated to the centre of the bucket that holds ``t - j``.
    """

    mode: BucketMode
    centres: tuple[int, ...]
    edges: tuple[float, ...]  # lower edge of each bucket (log mode); empty for single

    @classmethod
    def single(cls, distance: int = WROPE_DISTANCE) -> DistanceBuckets:
        return cls("single", (int(distance),), ())

    @classmethod
    def log_spaced(cls, max_distance: int, start: int = 64, ratio: float = 2.0) -> DistanceBuckets:
        """Buckets ``[start*ratio^b, start*ratio^(b+1))`` up to ``max_distance``, centred geometrically."""
        if ratio <= 1.0 or start < 1:
            raise ValueError("bucket ratio must be > 1 and start >= 1")
        n = max(1, math.ceil(math.log(max(max_distance, start + 1) / start) / math.log(ratio)))
        return cls.geometric(n, start, ratio)

    @classmethod
    def geometric(cls, count: int, start: float, ratio: float) -> DistanceBuckets:
        """``count`` buckets with lower edges ``start * ratio^b``, each centred at ``start * ratio^(b + 1/2)``."""
        edges = tuple(start * ratio**b for b in range(count))
        centres = tuple(int(round(start * ratio ** (b + 0.5))) for b in range(count))
        return cls("log", centres, edges)

    @classmethod
    def from_config(cls, spec: dict) -> DistanceBuckets:
        if spec["mode"] == "single":
            return cls.single(spec["centres"][0])
        return cls("log", tuple(int(c) for c in spec["centres"]), tuple(float(e) for e in spec["edges"]))

    def to_config(self) -> dict:
        return {"mode": self.mode, "centres": list(self.centres), "edges": list(self.edges)}

    @property
    def count(self) -> int:
        return len(self.centres)

    def bucket_of(self, distance: torch.Tensor) -> torch.Tensor:
        """Bucket index (long) of each relative distance ``t - j``: the last bucket whose lower edge is at most
        the distance (distances below the first edge fall in bucket 0). Any increasing edges are honoured; an edge
        within a relative 1e-9 above a distance still counts as reached, so that edges computed as
        ``start * ratio^b`` in floating point (128.00000000000003 for ratio √2) hold the distance they name."""
        if self.mode == "single":
            return torch.zeros_like(distance, dtype=torch.long)
        edges = torch.tensor(self.edges, dtype=torch.float64, device=distance.device) * (1.0 - 1e-9)
        b = torch.searchsorted(edges, distance.to(torch.float64).contiguous(), right=True) - 1
        return b.clamp_(0, self.count - 1)

    def row_buckets(self, length: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """Bucket (long) ``[length]`` of each cached row ``j`` seen from the newest row ``t = length - 1``."""
        return self.bucket_of(torch.arange(length - 1, -1, -1, device=device))
