"""Batched k-means: many independent heads at once as large batched matmuls, chunked over points.

Shapes: ``B`` heads trained together, ``N`` points per head, ``k`` codes, ``d`` dims. Distances come from
``||x||² − 2 x·c + ||c||²`` (``torch.baddbmm``), centroid sums from ``index_add_`` over flattened
(head, code) indices (deterministic on CPU). Every head's randomness comes from its own ``torch.Generator``
and converged heads are frozen, so a head's result does not depend on which other heads share its batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

DIST_BLOCK_ELEMENTS = 1 << 25  # one [B, chunk, k] distance block holds at most this many floats (128 MiB)

Seeding = str  # "kmeans||" (batched D² sampling in rounds) or "random" (distinct data points)
SEEDINGS = ("kmeans||", "random")


@dataclass
class KMeansResult:
    """Centroids ``[B, k, d]``; ``inertia [B]`` mean squared distance at the last assignment; per-head counts."""

    centroids: torch.Tensor
    inertia: torch.Tensor
    iterations: list[int]
    reseeded: list[int]


def _chunk(batch: int, n: int, k: int) -> int:
    return max(1, min(n, DIST_BLOCK_ELEMENTS // max(1, batch * k)))


@torch.no_grad()
def assign(
    x: torch.Tensor, centroids: torch.Tensor, chunk: int | None = None, valid: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centroid of every point: ``labels [B, N]`` (long) and squared distances ``[B, N]`` (≥ 0).

    ``valid [B, k]`` (bool, optional) marks the codes that may be chosen; the others (padding, with finite
    values) get ``+inf`` in the ``||c||²`` term and are never nearest while a head has one valid code.
    """
    b, n, _ = x.shape
    k = centroids.shape[1]
    chunk = chunk or _chunk(b, n, k)
    c_sq = (centroids * centroids).sum(-1)
    if valid is not None:
        c_sq = c_sq.masked_fill(~valid, float("inf"))
    c_sq = c_sq.unsqueeze(1)  # [B, 1, k]
    ct = centroids.transpose(1, 2)
    labels = torch.empty(b, n, dtype=torch.long, device=x.device)
    dist = torch.empty(b, n, dtype=x.dtype, device=x.device)
    for start in range(0, n, chunk):
        xs = x[:, start : start + chunk]
        block = torch.baddbmm(c_sq, xs, ct, alpha=-2.0)  # ||c||² − 2 x·c
        best, idx = block.min(-1)
        labels[:, start : start + chunk] = idx
        dist[:, start : start + chunk] = (best + (xs * xs).sum(-1)).clamp_min(0)
    return labels, dist


@torch.no_grad()
def cluster_sums(x: torch.Tensor, labels: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-cluster sums ``[B, k, d]`` and counts ``[B, k]`` (float64 sums, deterministic on CPU).

    On CPU the sums use ``index_put_(accumulate=True)`` (a serial loop in point order, several times faster than
    ``index_add_`` there, same result); pass ``x`` already in float64 to skip the conversion on repeated calls.
    """
    b, n, d = x.shape
    flat = (labels + torch.arange(b, device=x.device).reshape(b, 1) * k).reshape(-1)
    sums = torch.zeros(b * k, d, dtype=torch.float64, device=x.device)
    if x.device.type == "cpu":
        sums.index_put_((flat,), x.reshape(b * n, d).double(), accumulate=True)
    else:
        sums.index_add_(0, flat, x.reshape(b * n, d).double())
    counts = torch.bincount(flat, minlength=b * k).reshape(b, k)
    return sums.reshape(b, k, d), counts


def _reseed_empty(
    centroids: torch.Tensor, counts: torch.Tensor, x: torch.Tensor, dist: torch.Tensor, active: torch.Tensor
) -> list[int]:
    """Move each empty code of an active head onto a distinct point farthest from its centroid."""
    reseeded = [0] * x.shape[0]
    empty = (counts == 0) & active.reshape(-1, 1)
    for h in torch.nonzero(empty.any(-1)).flatten().tolist():
        codes = torch.nonzero(empty[h]).flatten()
        far = torch.topk(dist[h], codes.numel()).indices
        centroids[h, codes] = x[h, far]
        reseeded[h] = codes.numel()
    return reseeded


@torch.no_grad()
def lloyd(
    x: torch.Tensor,
    init: torch.Tensor,
    *,
    iters: int = 20,
    tol: float = 1e-4,
    chunk: int | None = None,
    on_iteration: Callable[[int, torch.Tensor], None] | None = None,
) -> KMeansResult:
    """Lloyd iterations from ``init [B, k, d]``; a head stops once its inertia changes by ≤ ``tol`` (relative).

    Empty clusters are re-seeded from the points farthest from their centroid, so no code is ever zero or NaN.
    """
    b, n, d = x.shape
    k = init.shape[1]
    centroids = init.to(x.dtype).clone()
    active = torch.ones(b, dtype=torch.bool, device=x.device)
    previous = torch.full((b,), float("inf"), dtype=torch.float64, device=x.device)
    inertia = previous.clone()
    done = [0] * b
    reseeded = [0] * b
    for step in range(iters):
        labels, dist_ = assign(x, centroids, chunk)
        current = dist_.double().mean(-1)
        inertia = torch.where(active, current, inertia)
        converged = active & torch.isfinite(previous) & ((previous - current).abs() <= tol * previous)
        active = active & ~converged
        previous = torch.where(active, current, previous)
        if on_iteration is not None:
            on_iteration(step, inertia)
        if not bool(active.any()):
            break
        sums, counts = cluster_sums(x, labels, k)
        means = (sums / counts.clamp_min(1).unsqueeze(-1).double()).to(x.dtype)
        update = active.reshape(b, 1) & (counts > 0)
        centroids = torch.where(update.unsqueeze(-1), means, centroids)
        for h, r in enumerate(_reseed_empty(centroids, counts, x, dist_, active)):
            reseeded[h] += r
        for h in torch.nonzero(active).flatten().tolist():
            done[h] += 1
    return KMeansResult(centroids, inertia.float(), done, reseeded)


@torch.no_grad()
def seed_centroids(
    x: torch.Tensor, k: int, generators: Sequence[torch.Generator], how: Seeding = "kmeans||", rounds: int = 8,
    chunk: int | None = None,
) -> torch.Tensor:
    """Initial centroids ``[B, k, d]`` from the data, one generator per head.

    ``kmeans||``: the first centre uniformly, then ``rounds`` rounds that each draw ``≈(k−1)/rounds`` distinct
    points with probability ∝ D² (squared distance to the nearest centre so far), distances updated between
    rounds with one batched assignment (k-means‖ without the re-clustering step: about one Lloyd iteration of
    work, batched, instead of k sequential k-means++ steps). ``random``: k distinct points uniformly.
    """
    b, n, d = x.shape
    if n < k:
        raise ValueError(f"{n} points cannot seed {k} codes")
    if how == "random":
        idx = torch.stack([torch.randperm(n, generator=g)[:k] for g in generators]).to(x.device)
        return x.gather(1, idx.unsqueeze(-1).expand(b, k, d)).clone()
    if how != "kmeans||":
        raise ValueError(f"unknown seeding {how!r}; choose from {SEEDINGS}")
    first = torch.stack([torch.randint(n, (1,), generator=g) for g in generators]).to(x.device)
    centres = [x.gather(1, first.unsqueeze(-1).expand(b, 1, d))]
    _, mind = assign(x, centres[0], chunk)
    have = 1
    per_round = max(1, math.ceil((k - 1) / max(1, rounds)))
    while have < k:
        m = min(per_round, k - have)
        weights = mind.double().cpu()
        weights = weights + weights.mean(-1, keepdim=True) * 1e-9 + 1e-300  # every point stays drawable
        idx = torch.stack([torch.multinomial(w, m, replacement=False, generator=g) for w, g in zip(weights, generators, strict=True)])
        new = x.gather(1, idx.to(x.device).unsqueeze(-1).expand(b, m, d))
        centres.append(new)
        have += m
        if have < k:
            _, dist_new = assign(x, new, chunk)
            mind = torch.minimum(mind, dist_new)
    return torch.cat(centres, 1)


def head_generator(seed: int, layer: int, head: int, salt: int = 0) -> torch.Generator:
    """The CPU generator of one (layer, head): depends only on these numbers, never on the batch or rank."""
    g = torch.Generator(device="cpu")
    g.manual_seed((int(seed) * 1_000_003 + layer * 10_007 + head * 101 + salt) % (2**63))
    return g


@torch.no_grad()
def kmeans(
    x: torch.Tensor,
    k: int,
    generators: Sequence[torch.Generator],
    *,
    iters: int = 20,
    tol: float = 1e-4,
    seeding: Seeding = "kmeans||",
    chunk: int | None = None,
    on_iteration: Callable[[int, torch.Tensor], None] | None = None,
) -> KMeansResult:
    """Seed then run Lloyd on every head of ``x [B, N, d]`` at once (``N ≥ k``)."""
    init = seed_centroids(x, k, generators, seeding, chunk=chunk)
    return lloyd(x, init, iters=iters, tol=tol, chunk=chunk, on_iteration=on_iteration)


@torch.no_grad()
def reference_lloyd(x: torch.Tensor, init: torch.Tensor, iters: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """A straightforward one-head Lloyd (``torch.cdist`` and a Python loop over clusters), for tests and benchmarks.

    ``x [N, d]``, ``init [k, d]``; returns ``(centroids, labels, inertia)`` after ``iters`` updates; an empty
    cluster keeps its centroid.
    """
    c = init.clone()
    for _ in range(iters):
        labels = torch.cdist(x.double(), c.double()).argmin(-1)
        for j in range(c.shape[0]):
            members = x[labels == j]
            if len(members):
                c[j] = members.double().mean(0).to(c.dtype)
    dist = torch.cdist(x.double(), c.double())
    best = dist.min(-1)
    return c, best.indices, float((best.values**2).mean())
