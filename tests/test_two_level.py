"""Two-level (coarse-to-fine) k-means: code allocation, masking, determinism, batch independence, quality."""

from __future__ import annotations

import pytest
import torch

from a2ats_tools.quantization.kmeans import assign, head_generator, kmeans
from a2ats_tools.quantization.two_level import (
    allocate_codes,
    default_coarse,
    distinct_per_cell,
    group_problems,
    masked_lloyd,
    masked_seed,
    two_level_kmeans,
)


def _mixture(heads: int, n: int, d: int, centres: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(heads, centres, d, generator=g) * 4
    pick = torch.randint(centres, (heads, n), generator=g)
    return means.gather(1, pick.unsqueeze(-1).expand(heads, n, d)) + torch.randn(heads, n, d, generator=g)


def _gens(b: int, seed: int = 0, first: int = 0) -> list[torch.Generator]:
    return [head_generator(seed, 0, h) for h in range(first, first + b)]


def _problem_gens(n: int, seed: int = 5) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed + i) for i in range(n)]


@pytest.mark.parametrize(
    ("counts", "k"),
    [([0, 5, 100, 3, 1], 20), ([1, 1, 1, 100], 50), ([7, 0, 0, 9], 16), ([1000] * 64, 4096), ([3, 3, 3], 9)],
)
def test_allocation_sums_to_k_and_respects_caps(counts, k):
    codes = allocate_codes(counts, k)
    assert sum(codes) == k
    for c, n in zip(codes, counts, strict=True):
        assert (c >= 1 if n > 0 else c == 0) and c <= n


def test_allocation_is_proportional_with_largest_remainders():
    g = torch.Generator().manual_seed(1)
    counts = torch.randint(200, 3000, (64,), generator=g)
    codes = allocate_codes(counts, 4096)
    quota = 4096 * counts.double() / counts.sum()
    assert sum(codes) == 4096
    assert ((torch.tensor(codes) - quota).abs() < 1).all()  # never off its quota by a whole code
    assert allocate_codes([10, 10, 10], 4) == [2, 1, 1]  # ties go to the lower cell


def test_allocation_caps_at_distinct_points_and_follows_weights():
    codes = allocate_codes([1000, 100, 100], 60, caps=[5, 100, 100])
    assert codes[0] == 5 and sum(codes) == 60  # the repeated cell's surplus goes to the others
    assert allocate_codes([10, 10], 10, weights=[7.0, 3.0]) == [7, 3]  # a proportion other than the counts
    with pytest.raises(ValueError, match="distinct points"):
        allocate_codes([100, 100], 20, caps=[5, 5])


def test_distinct_points_per_cell():
    x = torch.randn(10, 4)[torch.tensor([0, 0, 1, 2, 2, 2, 3, 4, 5, 5])]
    cells = torch.tensor([0, 0, 0, 1, 1, 1, 1, 2, 2, 2])
    assert distinct_per_cell(x, cells, 4).tolist() == [2, 2, 2, 0]


def test_repeated_keys_do_not_waste_codes():
    g = torch.Generator().manual_seed(7)
    distinct = torch.randn(1, 400, 8, generator=g) * 3
    pick = torch.multinomial(1.0 / torch.arange(1, 401).double(), 8000, replacement=True, generator=g)
    x = distinct[:, pick]  # like layer 0: few distinct keys with Zipf-like frequencies, 8000 points
    full = kmeans(x, 256, _gens(1), iters=20)
    two = two_level_kmeans(x, 256, _gens(1), iters=20)
    _, d_full = assign(x, full.centroids)
    _, d_two = assign(x, two.centroids)
    # the two-level split keeps the distortion near full Lloyd's (capping cells by their point counts alone would not)
    assert float(d_two.double().mean()) < 1.5 * float(d_full.double().mean())


def test_allocation_refuses_too_few_points():
    with pytest.raises(ValueError, match="points cannot seed"):
        allocate_codes([3, 4], 8)


def test_groups_cover_every_problem_once_and_limit_padding():
    sizes = [(n, max(1, n // 20)) for n in (1300, 90, 2500, 700, 1290, 40, 1310, 800)]
    groups = group_problems(sizes)
    assert sorted(i for g in groups for i in g) == list(range(len(sizes)))
    for g in groups:
        padded = len(g) * max(sizes[i][0] for i in g) * max(sizes[i][1] for i in g)
        assert len(g) == 1 or padded <= 1.25 * sum(sizes[i][0] * sizes[i][1] for i in g)


def test_bit_identical_under_seed_and_independent_of_batch():
    x = _mixture(4, 1500, 8, 30)
    a = two_level_kmeans(x, 64, _gens(4), iters=8)
    b = two_level_kmeans(x, 64, _gens(4), iters=8)
    assert torch.equal(a.centroids, b.centroids) and torch.equal(a.inertia, b.inertia)
    alone = two_level_kmeans(x[2:3], 64, _gens(1, first=2), iters=8)
    assert torch.equal(alone.centroids[0], a.centroids[2])
    assert torch.equal(alone.inertia[0], a.inertia[2])
    other = two_level_kmeans(x, 64, _gens(4, seed=1), iters=8)
    assert not torch.equal(other.centroids, a.centroids)


def test_padded_problem_matches_unpadded_and_ignores_padding():
    x = _mixture(2, 400, 6, 12, seed=2)
    alone_init = masked_seed(x[:1], torch.tensor([400]), torch.tensor([10]), _problem_gens(1))
    alone, alone_final = masked_lloyd(x[:1], torch.tensor([400]), alone_init, torch.tensor([10]), iters=10, tol=0.0)

    padded = torch.full((2, 600, 6), 1e4)  # padding far away: it would dominate any sum or D² draw it entered
    padded[0, :400] = x[0]
    padded[1, :600] = _mixture(1, 600, 6, 12, seed=3)[0]
    n_valid, k_valid = torch.tensor([400, 600]), torch.tensor([10, 17])
    gens = _problem_gens(1) + [torch.Generator().manual_seed(99)]
    init = masked_seed(padded, n_valid, k_valid, gens)
    result, final = masked_lloyd(padded, n_valid, init, k_valid, iters=10, tol=0.0)

    assert torch.equal(init[0, :10], alone_init[0])
    assert (init[0, 10:] == 0).all()  # padded codes stay unused
    torch.testing.assert_close(result.centroids[0, :10], alone.centroids[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(final[0], alone_final[0], rtol=1e-6, atol=1e-6)
    assert result.centroids[:, :10].abs().max() < 1e3  # no padded point ever became a code


def test_empty_codes_reseeded_on_real_points_never_zero():
    x = torch.full((1, 300, 4), 1e4)
    x[0, :200] = _mixture(1, 200, 4, 20, seed=4)[0]
    init = x[:, :1].repeat(1, 16, 1).clone()  # all codes on one point: 15 empty clusters
    result, _ = masked_lloyd(x, torch.tensor([200]), init, torch.tensor([16]), iters=10, tol=0.0)
    assert sum(result.reseeded) > 0
    assert torch.isfinite(result.centroids).all() and (result.centroids.abs().sum(-1) > 0).all()
    assert result.centroids.abs().max() < 1e3  # re-seeded from real points only
    labels, _ = assign(x[:, :200], result.centroids)
    assert labels.unique().numel() == 16


def test_no_nan_or_zero_codes_and_inertia_is_consistent():
    x = _mixture(2, 2000, 8, 40, seed=5)
    result = two_level_kmeans(x, 128, _gens(2), iters=10)
    assert result.centroids.shape == (2, 128, 8)
    assert torch.isfinite(result.centroids).all() and (result.centroids.abs().sum(-1) > 0).all()
    _, dist = assign(x, result.centroids)
    nearest = dist.double().mean(-1)
    assert (nearest <= result.inertia.double() * (1 + 1e-5)).all()  # cell-restricted inertia bounds the nearest
    assert all(1 <= i <= 10 for i in result.iterations)


def test_inertia_close_to_full_lloyd():
    x = _mixture(2, 6000, 16, 64, seed=6)  # measured ratio ≈ 1.00 (more codes than clusters, like real keys)
    full = kmeans(x, 256, _gens(2), iters=20)
    two = two_level_kmeans(x, 256, _gens(2), iters=20)
    _, d_full = assign(x, full.centroids)
    _, d_two = assign(x, two.centroids)
    ratio = d_two.double().mean(-1) / d_full.double().mean(-1)
    assert (ratio < 1.15).all(), ratio


def test_too_few_points_error_matches_kmeans():
    x = _mixture(1, 50, 4, 5)
    with pytest.raises(ValueError, match="50 points cannot seed 64 codes"):
        kmeans(x, 64, _gens(1))
    with pytest.raises(ValueError, match="50 points cannot seed 64 codes"):
        two_level_kmeans(x, 64, _gens(1))
    with pytest.raises(ValueError, match="coarse cells"):
        two_level_kmeans(_mixture(1, 500, 4, 5), 16, _gens(1), coarse=17)


def test_default_coarse_and_threads_restored():
    assert default_coarse(4096) == 64 and default_coarse(16) == 4 and default_coarse(1) == 1
    before = torch.get_num_threads()
    two_level_kmeans(_mixture(1, 300, 4, 5), 16, _gens(1), iters=2, threads=1)
    assert torch.get_num_threads() == before
