"""The one selection rule (:mod:`a2ats_tools.selection`): sinks and window always kept, padding never, each
sample its own budget, and exact re-ranking of an over-fetched candidate set."""

from __future__ import annotations

import pytest
import torch

from a2ats_tools.runtime.settings import RuntimeSettings
from a2ats_tools.selection import chosen_mask, forced_rows, kept_rows, select, step_budget, top_k


def settings(**kw) -> RuntimeSettings:
    return RuntimeSettings(**kw)


def test_forced_rows_with_left_padding():
    valid = torch.tensor([[False, False, True, True, True, True, True, True]])
    forced = forced_rows(valid, n_sink=2, window=3)
    assert forced.tolist() == [[False, False, True, True, False, True, True, True]]


def test_forced_rows_of_a_causal_prefix_end_at_its_last_real_row():
    valid = torch.arange(10) <= 6
    assert forced_rows(valid, 1, 2).nonzero().flatten().tolist() == [0, 5, 6]


def test_budget_rule_for_ints_and_tensors():
    assert top_k(1000, 0.03) == 30 and top_k(10, 0.03) == 1 and top_k(1000, 256) == 256
    assert top_k(torch.tensor([1000, 10, 50]), 0.03).tolist() == [30, 1, 2]  # round half to even: 1.5 -> 2
    assert kept_rows(20, 30, 8, 64) == 20 and kept_rows(1000, 30, 8, 64) == 102
    assert kept_rows(torch.tensor([20, 1000]), torch.tensor([30, 30]), 8, 64).tolist() == [20, 102]


def test_select_keeps_forced_and_budget():
    scores = torch.tensor([[[0.0, 5.0, 1.0, 9.0, 2.0, 3.0, 0.5, 0.1, 0.2, 0.3]]])
    valid = torch.ones(1, 10, dtype=torch.bool)
    idx, keep, _ = select(scores, valid, settings(n_sink=1, window=2, budget=2))
    assert set(idx[keep].tolist()) == {0, 8, 9, 3, 1}


def test_select_never_picks_invalid():
    scores = torch.randn(2, 1, 20)
    valid = torch.zeros(2, 20, dtype=torch.bool)
    valid[:, 15:] = True
    idx, keep, _ = select(scores, valid, settings(n_sink=2, window=2, budget=10))
    assert valid[:, None, :].expand(-1, 1, -1).gather(2, idx)[keep].all()
    assert keep.sum(-1).flatten().tolist() == [5, 5]


@pytest.mark.parametrize("budget", [20, 0.05, 500])  # 500: K larger than the candidate set
def test_left_padded_selection_is_each_samples_own_top_k(budget):
    gen = torch.Generator().manual_seed(3)
    b, hkv, length, n_sink, window = 2, 3, 300, 8, 64
    first = torch.tensor([0, 200])
    scores = torch.randn(b, hkv, length, generator=gen)
    valid = torch.arange(length) >= first[:, None]
    s = settings(n_sink=n_sink, window=window, budget=budget)
    chosen = chosen_mask(select(scores, valid, s), length)
    for bi in range(b):
        real = length - int(first[bi])
        top = top_k(real, s.budget)
        middle = scores[bi, :, int(first[bi]) + n_sink : length - window]
        best = middle.topk(min(top, middle.shape[-1]), -1).indices + int(first[bi]) + n_sink
        for h in range(hkv):
            want = set(range(int(first[bi]), int(first[bi]) + n_sink)) | set(range(length - window, length))
            want |= set(best[h].tolist())
            assert set(chosen[bi, h].nonzero().flatten().tolist()) == want
        assert chosen[bi].sum(-1).tolist() == [kept_rows(real, top, n_sink, window)] * hkv


def test_step_budget_describes_padding():
    valid = torch.ones(2, 100, dtype=torch.bool)
    plain = step_budget(valid, settings(budget=10))
    assert plain.forced is None and plain.uniform_top == 10 and plain.suffix[0].tolist() == [0, 0]
    valid[1, :30] = False
    padded = step_budget(valid, settings(budget=10))
    assert padded.uniform_top is None and padded.suffix[0].tolist() == [0, 30] and padded.rows.tolist() == [82, 70]
    valid[0, 50] = False  # a hole: not a suffix
    assert step_budget(valid, settings(budget=10)).suffix is None


def test_rerank_spans_approximate_to_oracle():
    """Over-fetch 1 keeps the approximate selection; over-fetching everything turns it into the oracle (the best
    rows by the group's exact logits)."""
    g = torch.Generator().manual_seed(2)
    b, hkv, grp, n = 3, 2, 2, 300
    exact = torch.randn(b, hkv, grp, n, generator=g) * 3
    approx = exact.sum(2) + torch.randn(b, hkv, n, generator=g) * 3  # a noisy estimate
    valid = torch.arange(n) <= torch.tensor([150, 220, 299])[:, None]

    def exact_of(rows):
        return exact.gather(-1, rows[:, :, None, :].expand(-1, -1, grp, -1))

    def rows(scores, **kw):
        return chosen_mask(select(scores, valid, settings(n_sink=2, window=4, budget=10, rerank_aggregation="sum",
                                                             **kw), exact=exact_of), n)

    base, oracle = rows(approx, rerank=0), rows(exact.sum(2), rerank=0)
    assert not torch.equal(base, oracle)
    assert torch.equal(rows(approx, rerank=1.0), base)
    assert torch.equal(rows(approx, rerank=1e4), oracle)
