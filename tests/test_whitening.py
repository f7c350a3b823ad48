"""Query-aware whitening: the whitened distance is the expected score error, and singular H still factors."""

from __future__ import annotations

import pytest
import torch

from a2ats_tools.errors import DataError
from a2ats_tools.quantization import whitening


def _spd(d: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, 3 * d, generator=g, dtype=torch.float64) * torch.linspace(0.1, 3.0, d, dtype=torch.float64).reshape(d, 1)
    return a @ a.T / (3 * d)


def test_whitened_distance_equals_score_error_under_h():
    h = torch.stack([_spd(16, 0), _spd(16, 1)])
    lower = whitening.cholesky(h).lower
    g = torch.Generator().manual_seed(2)
    k, c = torch.randn(2, 50, 16, generator=g, dtype=torch.float64), torch.randn(2, 50, 16, generator=g, dtype=torch.float64)
    whitened = ((k - c) @ lower).pow(2).sum(-1)
    score_error = torch.einsum("hni,hij,hnj->hn", k - c, h, k - c)
    torch.testing.assert_close(whitened, score_error, rtol=1e-10, atol=1e-12)
    # and the expected squared score error over queries with that second moment
    q = torch.randn(200000, 16, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(h[0]).T
    mc = ((q @ (k[0] - c[0]).T) ** 2).mean(0)
    torch.testing.assert_close(mc, whitened[0], rtol=0.05, atol=1e-3)


def test_unwhiten_inverts_whiten():
    lower = whitening.cholesky(_spd(8).unsqueeze(0)).lower[0]
    x = torch.randn(30, 8, dtype=torch.float64)
    torch.testing.assert_close(whitening.unwhiten(whitening.whiten(x, lower), lower), x, rtol=1e-9, atol=1e-9)


def test_singular_h_uses_jitter():
    v = torch.randn(8, 2, dtype=torch.float64)
    singular = (v @ v.T).unsqueeze(0)  # rank 2
    factor = whitening.cholesky(torch.cat([singular, _spd(8).unsqueeze(0)]))
    assert factor.jitter[0] > 0 and factor.jitter[1] == 0
    assert torch.isfinite(factor.lower).all()
    assert torch.diagonal(factor.lower[0]).min() > 0


def test_query_moment_selects_and_normalises():
    moments = torch.stack([_spd(8, i).unsqueeze(0) * (i + 1) for i in range(3)]) * 10  # [P=3, Hkv=1, d, d]
    count = torch.tensor([10])
    h_all = whitening.query_moment(moments, count, [64, 2048, 4096], "all")
    h_one = whitening.query_moment(moments, count, [64, 2048, 4096], 2048)
    for h in (h_all, h_one):
        assert torch.diagonal(h[0]).sum().item() == pytest.approx(8.0)
    torch.testing.assert_close(h_one[0], moments[1, 0] / (torch.diagonal(moments[1, 0]).sum() / 8))
    with pytest.raises(DataError, match="not in the calibration"):
        whitening.query_moment(moments, count, [64, 2048, 4096], 1000)
