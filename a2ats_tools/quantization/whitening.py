"""Query-aware whitening: the metric under which k-means minimises the expected squared score error.

For a key ``k`` replaced by a code ``c`` the score error of a WRoPE query ``q_w`` is ``q_w·(k − c)``; its
expected square is ``(k − c)ᵀ H (k − c)`` with ``H = E[q_w q_wᵀ]``. With ``H = L Lᵀ`` (Cholesky, float64),
that is ``||(k − c) L||²`` for row vectors, so k-means runs on whitened keys ``k L`` and the centroids map
back with ``L⁻¹`` (a triangular solve).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..errors import DataError

JITTERS = (0.0, 1e-10, 1e-8, 1e-6, 1e-4, 1e-2)  # relative to trace(H)/d, tried in order


@dataclass
class Factor:
    """The whitening factor ``L`` of each KV head ``[Hkv, d, d]`` (float64) and the jitter each one needed."""

    lower: torch.Tensor
    jitter: list[float]


def query_moment(
    wrope_moment: torch.Tensor, count: torch.Tensor, relative_positions: Sequence[int], positions: str | int = "all"
) -> torch.Tensor:
    """``H [Hkv, d, d]`` (float64), normalised to ``trace(H)/d == 1``, from stored moments ``[P, Hkv, d, d]``.

    ``positions="all"`` averages every stored relative position (the moment of bucketed queries); an int picks
    that stored position (e.g. 2048, the paper's WRoPE distance).
    """
    stored = [int(p) for p in relative_positions]
    if positions == "all" or positions is None:
        moment = wrope_moment.double().mean(0)
    else:
        pos = int(positions)
        if pos not in stored:
            raise DataError(f"relative position {pos} is not in the calibration (stored: {stored})")
        moment = wrope_moment[stored.index(pos)].double()
    moment = moment / count.double().clamp_min(1).reshape(-1, 1, 1)
    moment = 0.5 * (moment + moment.transpose(-1, -2))
    d = moment.shape[-1]
    scale = torch.diagonal(moment, dim1=-2, dim2=-1).sum(-1) / d
    if not torch.isfinite(moment).all() or (scale <= 0).any():
        raise DataError("the calibration's query moments are zero or not finite; re-run a2ats calibrate")
    return moment / scale.reshape(-1, 1, 1)


def cholesky(h: torch.Tensor) -> Factor:
    """Cholesky factors of ``h [Hkv, d, d]`` in float64, adding escalating jitter where not positive definite."""
    h = h.double()
    d = h.shape[-1]
    eye = torch.eye(d, dtype=torch.float64, device=h.device)
    factors, jitters = [], []
    for head in h:
        scale = float(torch.diagonal(head).sum()) / d or 1.0
        for jitter in JITTERS:
            lower, info = torch.linalg.cholesky_ex(head + jitter * scale * eye)
            if int(info) == 0 and torch.isfinite(lower).all():
                factors.append(lower)
                jitters.append(jitter)
                break
        else:
            raise DataError("a query moment is not positive definite even with jitter; check the calibration")
    return Factor(torch.stack(factors), jitters)


def identity(num_heads: int, head_dim: int) -> Factor:
    """The plain-VQ factor (Euclidean k-means)."""
    eye = torch.eye(head_dim, dtype=torch.float64).expand(num_heads, head_dim, head_dim).clone()
    return Factor(eye, [0.0] * num_heads)


def whiten(keys: torch.Tensor, lower: torch.Tensor) -> torch.Tensor:
    """Row-vector keys ``[..., N, d]`` into the whitened space: ``k L``."""
    return (keys.double() @ lower.double()).to(keys.dtype if keys.is_floating_point() else torch.float32)


def unwhiten(points: torch.Tensor, lower: torch.Tensor) -> torch.Tensor:
    """Map whitened rows ``[..., C, d]`` back: ``x L⁻¹`` via a triangular solve (float64 inside)."""
    out = torch.linalg.solve_triangular(lower.double(), points.double(), upper=False, left=False)
    return out.to(points.dtype)
