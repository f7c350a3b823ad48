"""The shared math: RoPE undo/rotation through the model's own module, distance buckets, selection."""

from __future__ import annotations

import math

import pytest
import torch

from a2ats_tools.models import rotary
from a2ats_tools.rope import DistanceBuckets, apply_rope, undo_rope
from a2ats_tools.runtime.settings import RuntimeSettings
from a2ats_tools.scoring import exact_logits, group_aggregate, mass_recall

from .conftest import build_tiny_model


@pytest.fixture(scope="module")
def rot():
    return rotary(build_tiny_model("llama"))


def test_undo_rope_inverts_apply(rot):
    x = torch.randn(3, 10, 16)
    cos, sin = rot.cos_sin(torch.arange(10))
    assert torch.allclose(undo_rope(apply_rope(x, cos, sin), cos, sin), x, atol=1e-5)


def test_rotation_matrix_matches_apply(rot):
    x = torch.randn(5, 16)
    cos, sin = rot.cos_sin(torch.tensor([777]))
    assert torch.allclose(x.double() @ rot.matrix(777), apply_rope(x, cos, sin).double(), atol=1e-5)


def test_relative_rotation_property(rot):
    """(R(t) q) . (R(j) k) == (R(t - j) q) . k: the identity WRoPE scoring relies on."""
    q, k = torch.randn(16), torch.randn(16)
    ct, st = rot.cos_sin(torch.tensor([900]))
    cj, sj = rot.cos_sin(torch.tensor([100]))
    true = (apply_rope(q, ct[0], st[0]) * apply_rope(k, cj[0], sj[0])).sum()
    rel = (rot.rotate_to(q, torch.tensor([800]))[0] * k).sum()
    assert torch.allclose(true, rel, atol=1e-4)


def test_log_buckets_cover_distances():
    assert DistanceBuckets.log_spaced(8192).count == 7  # default ratio 2
    b = DistanceBuckets.log_spaced(8192, start=64, ratio=math.sqrt(2))
    assert b.count == 14
    d = torch.tensor([0, 63, 64, 90, 91, 128, 4000, 8191, 100000])
    idx = b.bucket_of(d)
    assert idx.tolist()[:3] == [0, 0, 0]
    assert idx[3] == 0 and idx[4] == 1 and idx[5] == 2
    assert idx[-1] == b.count - 1
    for i, centre in enumerate(b.centres):  # every centre falls in its own bucket
        assert b.bucket_of(torch.tensor([centre])).item() == i
    assert DistanceBuckets.from_config(b.to_config()) == b
    assert DistanceBuckets.single(2048).bucket_of(d).eq(0).all()


def test_group_aggregation_shapes_and_sum():
    s = torch.randn(2, 6, 7)
    assert torch.allclose(group_aggregate(s, 2, "sum"), s.reshape(2, 2, 3, 7).sum(2))
    assert torch.allclose(group_aggregate(s, 2, "max"), s.reshape(2, 2, 3, 7).amax(2))
    soft = group_aggregate(s, 2, "softmax")
    assert torch.allclose(soft.sum(-1), torch.full((2, 2), 3.0))
    assert torch.equal(group_aggregate(s, 2, "softmax", finite=True), soft)  # no masked row: same result
    masked = s.clone()
    masked[0, :3] = float("-inf")  # a whole KV head's group masked out: zeros, not NaN
    assert torch.equal(group_aggregate(masked, 2, "softmax")[0, 0], torch.zeros(7))


def test_mass_recall_full_budget_is_one(rot):
    torch.manual_seed(0)
    q, k = torch.randn(4, 6, 16), torch.randn(2, 50, 16)
    pos = torch.tensor([10, 20, 30, 40, 45, 49])
    logits = exact_logits(q, pos, k, rot)
    full = mass_recall(logits, None, pos, RuntimeSettings(budget=1000), 0.25, 2)
    assert torch.allclose(full, torch.ones_like(full), atol=1e-5)
    small = mass_recall(logits, torch.randn_like(logits), pos, RuntimeSettings(n_sink=1, window=1, budget=2), 0.25, 2)
    oracle = mass_recall(logits, None, pos, RuntimeSettings(n_sink=1, window=1, budget=2), 0.25, 2)
    assert (small <= 1 + 1e-6).all() and oracle.mean() >= small.mean() - 0.05


@pytest.mark.parametrize("length", [1, 63, 64, 65, 200, 8192])
@pytest.mark.parametrize("ratio", [2.0, math.sqrt(2)])
def test_row_buckets_follow_the_bucket_edges(length, ratio):
    buckets = DistanceBuckets.log_spaced(8192, start=64, ratio=ratio)
    got = buckets.row_buckets(length)
    edges = buckets.edges
    for j in range(length):  # brute force: the last bucket whose lower edge is at most the distance (to 1e-9)
        dist = length - 1 - j
        want = max([b for b, e in enumerate(edges) if e * (1 - 1e-9) <= dist], default=0)
        assert int(got[j]) == want
    assert torch.equal(DistanceBuckets.single(2048).row_buckets(length), torch.zeros(length, dtype=torch.long))


def test_bucket_of_honours_stored_edges_that_are_not_geometric():
    buckets = DistanceBuckets.from_config({"mode": "log", "centres": [80, 300, 2000], "edges": [64.0, 128.0, 1000.0]})
    dist = torch.tensor([0, 63, 64, 127, 128, 500, 999, 1000, 5000])
    assert buckets.bucket_of(dist).tolist() == [0, 0, 0, 0, 1, 1, 1, 2, 2]
