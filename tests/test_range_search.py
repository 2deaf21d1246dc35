"""The MSE range search: batched search against a written-out one, and the periodic search
(``search_every``) against a full search at every step."""

import pytest
import torch
from torch import nn

from qexp.quant.layers import QLinear, refresh_weight_ranges
from qexp.quant.uniform import MSE_RATIOS, UniformQuantizer, grid_for_range, mse_optimal_range


def reference_mse_range(x2d: torch.Tensor, bits: int, signed: bool, signed_grid: str):
    """One candidate and one row at a time, error measured by torch's fake-quant op where it
    applies (unsigned and narrow grids) and by the grid's snap otherwise."""
    out = []
    for row in x2d:
        top = row.abs().max() if signed else row.clamp(min=0).max()
        best_err, best_rng = None, None
        for ratio in MSE_RATIOS:
            rng = ratio * top
            grid = grid_for_range(rng, bits, signed, signed_grid)
            if not signed:
                q = torch.fake_quantize_per_tensor_affine(
                    row, float(grid.step), 0, 0, grid.num_levels - 1
                )
            elif signed_grid == "narrow" and bits > 1:
                half = grid.num_levels // 2
                q = torch.fake_quantize_per_tensor_affine(row, float(grid.step), 0, -half, half)
            else:
                q = grid.snap(row)
            err = float(((q - row) ** 2).sum())
            if best_err is None or err < best_err:
                best_err, best_rng = err, rng
        out.append(best_rng)
    return torch.stack(out)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("signed,signed_grid", [(True, "midrise"), (True, "narrow"), (False, "")])
def test_batched_search_matches_one_candidate_at_a_time(bits, signed, signed_grid):
    torch.manual_seed(bits)
    x = torch.randn(6, 257) * torch.linspace(0.1, 3.0, 6)[:, None]
    got = mse_optimal_range(x, bits, signed, signed_grid or "midrise")
    ref = reference_mse_range(x, bits, signed, signed_grid or "midrise")
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=0)


def test_search_in_chunks_matches_one_pass(monkeypatch):
    import qexp.quant.uniform as uniform

    x = torch.randn(5, 400)
    whole = mse_optimal_range(x, 3, True)
    monkeypatch.setattr(uniform, "_SEARCH_CHUNK", 3 * x.numel())  # 3 candidates per pass
    torch.testing.assert_close(mse_optimal_range(x, 3, True), whole, rtol=0, atol=0)


def _full_range(w: torch.Tensor, bits: int) -> torch.Tensor:
    return mse_optimal_range(w.detach().reshape(w.shape[0], -1), bits, True)


def _train_range(q: UniformQuantizer, w: torch.Tensor) -> torch.Tensor:
    return q.grid(w).step.reshape(-1) * (2 ** (q.bits - 1) - 0.5)


@pytest.mark.parametrize("every", [1, 7])
def test_periodic_search_lands_on_the_full_search(every):
    """Weights drift like training; the kept ratio is the full search's at every search step,
    and once the weights settle the next search lands on the full range exactly."""
    torch.manual_seed(0)
    q = UniformQuantizer(2, "weight", search_every=every)
    w = nn.Parameter(torch.randn(8, 3, 3, 3))
    q.observe(w)  # calibration: the first search
    torch.testing.assert_close(_train_range(q, w), _full_range(w, 2))
    differs = 0
    for step in range(1, 43):
        with torch.no_grad():
            w.mul_(1.01).add_(0.05 * torch.randn_like(w))
        q.refresh(w, step)
        rng = _train_range(q, w)
        if step % every == 0:
            torch.testing.assert_close(rng, _full_range(w, 2), rtol=1e-6, atol=0)
        differs += int(not torch.allclose(rng, _full_range(w, 2)))
        # evaluation always searches the weights it is given
        q.eval()
        torch.testing.assert_close(
            q.grid(w).step.reshape(-1) * 1.5, _full_range(w, 2), rtol=1e-6, atol=0
        )
        q.train()
    if every > 1:
        assert differs > 0  # the drift is large enough that the kept ratio goes stale
    else:
        assert differs == 0
    # the weights settle: by the next search the cheap range is the full one for good
    for step in range(43, 43 + every):
        q.refresh(w, step)
    torch.testing.assert_close(_train_range(q, w), _full_range(w, 2), rtol=1e-6, atol=0)


def test_kept_ratio_scales_with_the_current_max_abs():
    q = UniformQuantizer(3, "weight", search_every=100)
    w = nn.Parameter(torch.randn(4, 50))
    q.observe(w)
    before = _train_range(q, w)
    with torch.no_grad():
        w.mul_(2.0)  # a scale change leaves the optimal ratio unchanged
    q.refresh(w, 1)  # not a search step
    torch.testing.assert_close(_train_range(q, w), 2.0 * before)
    torch.testing.assert_close(_train_range(q, w), _full_range(w, 3))


def test_kept_ratio_survives_a_checkpoint_round_trip():
    torch.manual_seed(1)
    layer = QLinear.from_float(
        nn.Linear(20, 6), UniformQuantizer(2, "weight", search_every=50), None, "body"
    )
    refresh_weight_ranges(layer, 1)  # no ratio yet: the first refresh searches
    with torch.no_grad():
        layer.weight.add_(0.3 * torch.randn_like(layer.weight))
    fresh = QLinear.from_float(
        nn.Linear(20, 6), UniformQuantizer(2, "weight", search_every=50), None, "body"
    )
    fresh.load_state_dict(layer.state_dict())
    assert fresh.w_quant.clip_ratio.shape == (6,)
    torch.testing.assert_close(fresh.quant_weight(), layer.quant_weight(), rtol=0, atol=0)
    # the stale ratio was restored, not re-searched
    assert not torch.allclose(_train_range(fresh.w_quant, fresh.weight),
                              _full_range(fresh.weight, 2))


def test_search_every_must_be_positive():
    with pytest.raises(ValueError, match="search_every"):
        UniformQuantizer(4, "weight", search_every=0)
