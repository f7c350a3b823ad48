"""Rotary position embeddings as the model itself computes them, and WRoPE distance buckets.

All rotations go through the model's own rotary-embedding module (``rotary(x, position_ids) -> cos, sin``),
so every RoPE variant transformers implements (default, linear, llama3, yarn, ...) is served by one path.
How a model pairs the dimensions it rotates is a :class:`RopeLayout`: transformers' ``rotate_half`` halves
(Llama and most others), adjacent pairs (GLM, Cohere), or no rotation at all (a layer without RoPE). A partial
rotary embedding (``partial_rotary_factor`` < 1: GLM-4, Phi) rotates the leading ``cos.shape[-1]`` dimensions
only; the others are position-free and pass through every rotation here unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

Pairing = Literal["halves", "adjacent", "none"]


@dataclass(frozen=True)
class RopeLayout:
    """Which dimensions a model's RoPE rotates together, and how its ``cos``/``sin`` factors are laid out.

    ``pairs``: ``halves`` rotates ``(i, i + r/2)`` (``rotate_half``), ``adjacent`` rotates ``(2i, 2i + 1)``,
    ``none`` rotates nothing (the layer applies no positional rotation). ``factors``: the layout of the factors
    the model's rotary module emits, ``halves`` (``cat(freqs, freqs)``) or ``adjacent``
    (``repeat_interleave(freqs, 2)``). GLM pairs adjacent dimensions from ``halves`` factors; Cohere emits
    ``adjacent`` ones. ``r``, the rotated width, is the factors' last dimension.
    """

    pairs: Pairing = "halves"
    factors: Literal["halves", "adjacent"] = "halves"

    @property
    def name(self) -> str:
        if self.pairs == "none":
            return "no rotation (NoPE)"
        return f"{self.pairs} pairs from {self.factors} factors"

    def paired_factors(self, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The factors laid out as the pairing reads them (each pair's two dimensions share one angle)."""
        if self.pairs == "none" or self.pairs == self.factors:
            return cos, sin
        half = cos.shape[-1] // 2
        if self.pairs == "adjacent":  # GLM: the first half of cat(freqs, freqs), each angle twice in a row
            return cos[..., :half].repeat_interleave(2, -1), sin[..., :half].repeat_interleave(2, -1)
        return torch.cat((cos[..., ::2], cos[..., ::2]), -1), torch.cat((sin[..., ::2], sin[..., ::2]), -1)

    def rotate(self, x: torch.Tensor) -> torch.Tensor:
        """The pairing's quarter turn: ``(a, b) -> (-b, a)`` for every pair."""
        if self.pairs == "adjacent":
            return torch.stack((-x[..., 1::2], x[..., 0::2]), dim=-1).flatten(-2)
        return rotate_half(x)


HALVES = RopeLayout()  # transformers' rotate_half convention, what the fused CPU kernel implements


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """Rotate the two halves of the last dimension: ``(x1, x2) -> (-x2, x1)``."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rotated(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layout: RopeLayout, forward: bool) -> torch.Tensor:
    """``x`` with its leading ``cos.shape[-1]`` dimensions rotated forward or back (divided by
    the factors' squared norm, so that attention scaling folded into ``cos``/``sin`` is undone too); the other
    dimensions pass through (broadcast against the factors' leading shape)."""
    if layout.pairs == "none":  # position-free: only broadcast, as a rotation would
        return x.expand(*torch.broadcast_shapes(x.shape[:-1], cos.shape[:-1]), x.shape[-1])
    r = cos.shape[-1]
    cos, sin = layout.paired_factors(cos, sin)
    head = x if r == x.shape[-1] else x[..., :r]
    if forward:
        out = head * cos + layout.rotate(head) * sin
    else:
        out = (head * cos - layout.rotate(head) * sin) / (cos * cos + sin * sin).clamp_min(1e-12)
    if r == x.shape[-1]:
        return out
    rest = x[..., r:]
    return torch.cat((out, rest.expand(*out.shape[:-1], rest.shape[-1])), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layout: RopeLayout = HALVES) -> torch.Tensor:
    """Rotate ``x`` by the angles encoded in ``cos``/``sin`` (broadcast against ``x``), as ``layout`` pairs them."""
    return _rotated(x, cos, sin, layout, True)


def undo_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layout: RopeLayout = HALVES) -> torch.Tensor:
    """Invert :func:`apply_rope` exactly, including any attention scaling folded into ``cos``/``sin``."""
    return _rotated(x, cos, sin, layout, False)


def undo_rope_keys(
    keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layout: RopeLayout = HALVES
) -> torch.Tensor:
    """Cached keys ``[B, Hkv, n, d]`` back to pre-RoPE form (float32) with the factors ``[B or 1, n, r]`` that
    rotated them (the model's ``position_embeddings``, shared by the KV heads)."""
    return undo_rope(keys.float(), cos[:, None].float(), sin[:, None].float(), layout)


class Rotary:
    """One layer type's rotary embedding evaluated at arbitrary (relative) positions, in float32.

    Built from the module's own buffers, never re-derived from ``rope_theta``: its inverse frequencies
    (``{layer_type}_inv_freq`` where the module keeps one set per layer type, as Gemma 3 does, else ``inv_freq``)
    and its attention scaling (yarn's factor, longrope's), so every rope type transformers implements (default,
    linear, dynamic, yarn, longrope, llama3) is served by one path. Dynamic and longrope modules switch
    frequencies with the sequence length; this uses their native set (``original_inv_freq``), the one they use
    within ``max_position_embeddings``. The module's forward is not called, so its state never changes.
    ``rotary_dim`` (twice the frequencies) may be below ``head_dim`` (partial rotary); ``layout`` is how the
    model pairs the rotated dimensions and lays out its factors.
    """

    def __init__(self, module: nn.Module, head_dim: int, layer_type: str | None = None, layout: RopeLayout = HALVES):
        self.module = module
        self.head_dim = head_dim
        self.layer_type = layer_type
        self.layout = layout
        prefix = f"{layer_type}_" if layer_type and hasattr(module, f"{layer_type}_inv_freq") else ""
        inv_freq = getattr(module, f"{prefix}original_inv_freq", None)
        if inv_freq is None:
            inv_freq = getattr(module, f"{prefix}inv_freq")
        self.inv_freq = inv_freq.detach().float().cpu()
        self.attention_scaling = float(getattr(module, f"{prefix}attention_scaling", 1.0))
        self.rotary_dim = 2 * self.inv_freq.numel()
        if self.rotary_dim > head_dim:
            raise ValueError(f"the rotary module rotates {self.rotary_dim} dimensions of a {head_dim}-dimensional head")

    @property
    def full(self) -> bool:
        """Whether every dimension is rotated by ``rotate_half`` (what the fused CPU kernel implements)."""
        return self.layout == HALVES and self.rotary_dim == self.head_dim

    def describe(self) -> str:
        """The rotation in words, for messages."""
        if self.layout.pairs == "none":
            return self.layout.name
        return f"{self.rotary_dim} of {self.head_dim} dimensions rotated, {self.layout.name}"

    @torch.no_grad()
    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``positions`` of any shape -> ``cos, sin`` of shape ``[*positions.shape, rotary_dim]`` (float32), as the
        model's forward computes them (``cat(freqs, freqs)`` or, for ``adjacent`` factors, each frequency twice in
        a row; times the attention scaling)."""
        freqs = positions.to("cpu", torch.float32)[..., None] * self.inv_freq
        if self.layout.factors == "adjacent":
            emb = freqs.repeat_interleave(2, dim=-1)
        else:
            emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos() * self.attention_scaling, emb.sin() * self.attention_scaling
        return cos.to(positions.device), sin.to(positions.device)

    def relative_cos_sin(self, distances: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Factors of the relative rotation between a query at ``t`` and a key at ``t - distance``: the model
        rotates both, so their logit is ``(R(distance) q) . k`` with the attention scaling squared on the rotated
        dimensions (and none on pass-through ones). Scoring with these keeps the two kinds of dimension weighed
        as in the true logit; with scaling 1 they are :meth:`cos_sin`."""
        cos, sin = self.cos_sin(distances)
        if self.attention_scaling == 1.0:
            return cos, sin
        return cos * self.attention_scaling, sin * self.attention_scaling

    def apply(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """:func:`apply_rope` in this embedding's layout."""
        return apply_rope(x, cos, sin, self.layout)

    def matrix(self, distance: int | float) -> torch.Tensor:
        """The ``[head_dim, head_dim]`` matrix ``M`` with ``apply_rope(x) == x @ M`` at ``distance`` (float64);
        the identity on pass-through dimensions."""
        cos, sin = self.cos_sin(torch.tensor([int(round(distance))]))
        eye = torch.eye(self.head_dim, dtype=torch.float32)
        return self.apply(eye, cos[0], sin[0]).double()

    def rotate_to(self, x: torch.Tensor, distances: torch.Tensor) -> torch.Tensor:
        """Rotate vectors ``x [..., d]`` to each of ``distances [P]`` -> ``[..., P, d]`` (float32)."""
        cos, sin = self.cos_sin(distances)
        return self.apply(x.float().unsqueeze(-2), cos, sin)


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
