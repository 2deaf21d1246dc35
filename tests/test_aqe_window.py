"""AQE's stand-in on a fine grid sums only the midpoints near each value: the same values and
derivatives as the full sum over every midpoint (written out here), to float precision."""

from __future__ import annotations

import pytest
import torch

from qexp.estimators import aqe


def full_sum(u: torch.Tensor, offset: float, num_levels: int, beta: float):
    """``offset + sum_i (1 + tanh(beta (u - c_i))) / 2`` and its derivative, every midpoint."""
    c = offset + torch.arange(num_levels - 1, dtype=u.dtype) + 0.5
    t = torch.tanh(beta * (u[..., None] - c))
    return offset + (0.5 * (1 + t)).sum(-1), (0.5 * beta * (1 - t * t)).sum(-1)


@pytest.mark.parametrize("num_levels,offset", [(256, -128.0), (255, -127.0), (256, 0.0)])
@pytest.mark.parametrize("beta", [0.5, 1.0, 4.0, 20.0])
def test_windowed_stand_in_matches_the_full_sum(num_levels, offset, beta):
    torch.manual_seed(0)
    centre = offset + num_levels / 2
    u = torch.cat([torch.randn(4000, dtype=torch.float64) * num_levels / 3 + centre,
                   torch.tensor([-1e4, 1e4, offset, offset + num_levels - 1, offset + 0.5,
                                 offset + num_levels - 1.5], dtype=torch.float64)])  # fmt: skip
    assert num_levels > aqe.WINDOW_ABOVE_LEVELS  # the windowed path is the one under test
    f, fp = aqe._soft_index(u, offset, num_levels, beta)
    ref_f, ref_fp = full_sum(u, offset, num_levels, beta)
    assert torch.allclose(f, ref_f, rtol=0, atol=1e-6)
    assert torch.allclose(fp, ref_fp, rtol=0, atol=1e-6)


def test_coarse_grids_keep_the_exact_sum():
    u = torch.linspace(-3, 3, 101, dtype=torch.float64)
    f, fp = aqe._soft_index(u, -2.0, 4, 2.0)
    ref_f, ref_fp = full_sum(u, -2.0, 4, 2.0)
    assert torch.allclose(f, ref_f, atol=1e-12) and torch.allclose(fp, ref_fp, atol=1e-12)
