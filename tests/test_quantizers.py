"""Quantizer grids against torch's own fake-quant ops and brute-force references."""

import pytest
import torch

from qexp.quant.binary import BinaryQuantizer
from qexp.quant.uniform import UniformQuantizer, grid_for_range, mse_optimal_range
from qexp.train.inspect_levels import distinct_per_row


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_unsigned_grid_matches_torch_fake_quant(bits):
    x = torch.rand(2000) * 3.0
    rng = torch.tensor(2.5)
    grid = grid_for_range(rng, bits, signed=False)
    scale = float(rng) / (2**bits - 1)
    ref = torch.fake_quantize_per_tensor_affine(x, scale, 0, 0, 2**bits - 1)
    torch.testing.assert_close(grid.snap(x), ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_narrow_signed_grid_matches_torch_fake_quant_per_channel(bits):
    w = torch.randn(6, 3, 3, 3)
    rng = w.abs().reshape(6, -1).amax(dim=1)
    half = 2 ** (bits - 1) - 1
    grid = grid_for_range(rng.view(-1, 1, 1, 1), bits, signed=True, signed_grid="narrow")
    ref = torch.fake_quantize_per_channel_affine(
        w, rng / half, torch.zeros(6, dtype=torch.int32), 0, -half, half
    )
    torch.testing.assert_close(grid.snap(w), ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_midrise_weight_grid_is_symmetric_with_all_levels(bits):
    q = UniformQuantizer(bits, "weight", per_channel=True, scale_method="max_abs")
    torch.manual_seed(0)
    v = torch.rand(8, 1000) * 2 - 1
    w = torch.cat([v, -v], dim=1)  # symmetric rows, so both outermost levels are used
    hard = q.hard(w)
    counts = distinct_per_row(hard)
    assert int(counts.max()) <= 2**bits
    assert int(counts.min()) == 2**bits  # 2000 uniform values hit every level
    # symmetric: the set of levels of each row is closed under negation
    for row in hard:
        levels = set(torch.unique(row).tolist())
        assert levels == {-v for v in levels}
    # outermost levels sit at the max-abs range
    torch.testing.assert_close(hard.abs().amax(dim=1), w.abs().amax(dim=1))


def test_mse_range_beats_max_abs_at_low_bits():
    torch.manual_seed(0)
    w = torch.randn(4, 4096)
    rng_mse = mse_optimal_range(w, 2, signed=True)
    rng_max = w.abs().amax(dim=1)
    assert torch.all(rng_mse <= rng_max)
    err = {}
    for name, rng in (("mse", rng_mse), ("max", rng_max)):
        err[name] = (grid_for_range(rng[:, None], 2, True).snap(w) - w).pow(2).sum()
    assert err["mse"] < 0.7 * err["max"]


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_activation_quantizer_tracks_range_and_levels(bits):
    q = UniformQuantizer(bits, "activation", scale_method="max_abs", momentum=0.5)
    x1 = torch.relu(torch.randn(64, 8, 5, 5))
    q.observe(x1)
    assert not q._is_signed()
    torch.testing.assert_close(q.range, x1.max())
    x2 = x1 * 3
    q.observe(x2)
    torch.testing.assert_close(q.range, 0.5 * x1.max() + 0.5 * x2.max())
    hard = q.hard(x2)
    assert hard.min() >= 0
    assert torch.unique(hard).numel() <= 2**bits


def test_activation_quantizer_goes_signed_on_negative_inputs():
    q = UniformQuantizer(2, "activation")
    q.observe(torch.randn(1000))
    assert q._is_signed()
    assert q.hard(torch.randn(1000)).min() < 0


def test_binary_quantizer_matches_sign_times_mean_abs():
    w = torch.randn(5, 4, 3, 3)
    w[0, 0, 0, 0] = 0.0
    q = BinaryQuantizer(1, "weight", per_channel=True)
    alpha = w.abs().mean(dim=(1, 2, 3))
    expected = torch.where(w >= 0, 1.0, -1.0) * alpha.view(-1, 1, 1, 1)
    torch.testing.assert_close(q.hard(w), expected)
    a = BinaryQuantizer(1, "activation")
    x = torch.randn(100)
    torch.testing.assert_close(a.hard(x), torch.where(x >= 0, 1.0, -1.0))


def test_binary_rejects_other_bit_widths():
    with pytest.raises(ValueError):
        BinaryQuantizer(2, "weight")


def test_snap_paths_agree_with_and_without_autograd():
    grid = grid_for_range(torch.tensor([[0.7], [1.3]]), 3, signed=True)
    x = torch.randn(2, 500)
    fast = grid.snap(x)
    slow = grid.snap(x.clone().requires_grad_(True))
    torch.testing.assert_close(fast, slow.detach())


def test_data_decided_sign_survives_a_checkpoint_round_trip():
    q = UniformQuantizer(2, "activation")
    q.observe(torch.randn(1000))  # negative values: the grid becomes signed
    fresh = UniformQuantizer(2, "activation")
    assert fresh.signed_state.item() == -1
    torch.nn.Sequential(fresh).load_state_dict(torch.nn.Sequential(q).state_dict())
    assert fresh._is_signed() and fresh.signed_state.item() == 1
    x = torch.randn(500)
    torch.testing.assert_close(fresh.hard(x), q.hard(x))
