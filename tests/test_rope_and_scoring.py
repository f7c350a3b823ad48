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


def _partial_rotary_model(family: str):
    """A tiny partial-rotary decoder (half the head rotated): GLM-4 (adjacent pairs) or Phi-3 with longrope
    scaling (Phi-4-mini's layout, an attention scaling above 1)."""
    import transformers as tf

    common = dict(vocab_size=256, hidden_size=64, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=16, num_hidden_layers=1, pad_token_id=0, bos_token_id=1, eos_token_id=1)
    if family == "glm4":
        config = tf.Glm4Config(**common)
    else:
        rope = {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0, 1.1, 1.3, 1.6],
                "long_factor": [1.0, 2.0, 4.0, 8.0], "factor": 4.0, "partial_rotary_factor": 0.5}
        config = tf.Phi3Config(rope_parameters=rope, max_position_embeddings=2048, **common)
    torch.manual_seed(0)
    return tf.AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("family", ["glm4", "phi3-longrope"])
def test_partial_rotary_tables_give_the_true_logit_at_a_bucket_centre(family):
    """A²ATS's score table, for a key exactly at a bucket centre's distance, is the true RoPE logit: the rotated
    dimensions carry the relative rotation (attention scaling included), the pass-through ones enter as they
    are; undoing RoPE leaves the pass-through dimensions untouched."""
    from a2ats_tools.kernels.score_select import build_tables

    rot = rotary(_partial_rotary_model(family))
    assert rot.rotary_dim == 8 and not rot.full
    assert (rot.attention_scaling > 1.0) == (family == "phi3-longrope")
    g = torch.Generator().manual_seed(3)
    q, k = torch.randn(1, 2, 16, generator=g), torch.randn(2, 16, 5, generator=g)  # [B, Hq, d], codebook [Hkv, d, C]
    centres = torch.tensor([64, 300])
    cos, sin = rot.relative_cos_sin(centres)
    table = build_tables(q, k, cos, sin, "max", layout=rot.layout).reshape(2, 2, 5)  # [Hkv, P, C] (G = 1)
    t = 1000
    for p, c in enumerate(centres.tolist()):
        cq, sq = rot.cos_sin(torch.tensor([t]))
        ck, sk = rot.cos_sin(torch.tensor([t - c]))
        q_post = rot.apply(q[0], cq, sq)  # [Hq, d]
        k_post = rot.apply(k.transpose(1, 2), ck, sk)  # [Hkv, C, d]
        true = torch.einsum("hd,hcd->hc", q_post, k_post)
        torch.testing.assert_close(table[:, p], true, atol=1e-4, rtol=1e-4)
        assert torch.equal(k_post[..., 8:], k.transpose(1, 2)[..., 8:])
        back = undo_rope(k_post, ck, sk, rot.layout)
        torch.testing.assert_close(back, k.transpose(1, 2), atol=1e-5, rtol=1e-5)


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
