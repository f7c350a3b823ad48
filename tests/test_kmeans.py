"""Batched k-means: agrees with a brute-force reference, is deterministic, and never leaves a dead code."""

from __future__ import annotations

import torch

from a2ats_tools.quantization.kmeans import (
    assign,
    head_generator,
    kmeans,
    lloyd,
    reference_lloyd,
    seed_centroids,
)


def _mixture(heads: int, n: int, d: int, centres: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(heads, centres, d, generator=g) * 4
    pick = torch.randint(centres, (heads, n), generator=g)
    return means.gather(1, pick.unsqueeze(-1).expand(heads, n, d)) + torch.randn(heads, n, d, generator=g)


def _gens(b: int, seed: int = 0):
    return [head_generator(seed, 0, h) for h in range(b)]


def test_matches_brute_force_reference_from_same_init():
    x = _mixture(3, 600, 8, 10)
    init = seed_centroids(x, 12, _gens(3), "random")
    ours = lloyd(x, init, iters=6, tol=0.0, chunk=97)  # odd chunk: exercises the chunking
    for h in range(3):
        centroids, labels, inertia = reference_lloyd(x[h], init[h], 6)
        torch.testing.assert_close(ours.centroids[h], centroids, rtol=1e-5, atol=1e-5)
        ours_labels, ours_dist = assign(x[h : h + 1], ours.centroids[h : h + 1])
        assert torch.equal(ours_labels[0], labels)
        assert abs(float(ours_dist.double().mean()) - inertia) < 1e-4 * inertia


def test_bit_identical_under_seed_and_independent_of_batching():
    x = _mixture(4, 500, 8, 6)
    a = kmeans(x, 16, _gens(4), iters=8)
    b = kmeans(x, 16, _gens(4), iters=8)
    assert torch.equal(a.centroids, b.centroids)
    alone = kmeans(x[2:3], 16, [head_generator(0, 0, 2)], iters=8)
    assert torch.equal(alone.centroids[0], a.centroids[2])
    other_seed = kmeans(x, 16, _gens(4, seed=1), iters=8)
    assert not torch.equal(other_seed.centroids, a.centroids)


def test_empty_clusters_are_reseeded_not_zero():
    x = _mixture(2, 400, 4, 40, seed=3)
    init = x[:, :1].repeat(1, 32, 1).clone()  # every code starts on the same point: 31 empty clusters
    result = lloyd(x, init, iters=10, tol=0.0)
    assert sum(result.reseeded) > 0
    assert torch.isfinite(result.centroids).all()
    assert (result.centroids.abs().sum(-1) > 0).all()
    labels, _ = assign(x, result.centroids)
    for h in range(2):
        assert labels[h].unique().numel() == 32  # all codes used: the data have 400 distinct points


def test_kmeans_lowers_inertia_and_stops_on_tolerance():
    x = _mixture(2, 800, 8, 16)
    seeded = seed_centroids(x, 16, _gens(2))
    _, d0 = assign(x, seeded)
    result = kmeans(x, 16, _gens(2), iters=50, tol=1e-3)
    assert (result.inertia < d0.mean(-1)).all()
    assert max(result.iterations) < 50
