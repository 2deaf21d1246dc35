"""STE and clipped STE gradients against autograd of the identity and of hardtanh."""

import pytest
import torch
from torch import nn

from qexp.estimators.clipped_ste import ClippedSTE
from qexp.estimators.ste import STE
from qexp.quant.layers import QLinear
from qexp.quant.refs import keep_reference
from qexp.quant.uniform import UniformQuantizer


def _layer(estimator, bits=2):
    lin = nn.Linear(16, 4)
    layer = QLinear.from_float(
        lin,
        UniformQuantizer(bits, "weight"),
        UniformQuantizer(bits, "activation", signed=True),
        "body",
    )
    keep_reference(layer, "estimator", estimator)
    keep_reference(estimator, "model", nn.Sequential(layer))
    return layer


def test_ste_weight_and_activation_gradients_are_identity():
    torch.manual_seed(0)
    layer = _layer(STE())
    w = layer.weight.detach().clone().requires_grad_(True)
    x = torch.randn(32, 16, requires_grad=True)
    g = torch.randn(4, 16)
    est = layer.estimator
    (est.weight(layer, w) * g).sum().backward()
    # autograd of the identity: d(sum(w * g))/dw = g
    w_ref = w.detach().clone().requires_grad_(True)
    (w_ref * g).sum().backward()
    torch.testing.assert_close(w.grad, w_ref.grad)
    layer.a_quant.observe(x.detach())
    gx = torch.randn(32, 16)
    (est.activation(layer, x) * gx).sum().backward()
    torch.testing.assert_close(x.grad, gx)


def test_ste_forward_is_hard_quantized():
    layer = _layer(STE())
    w = layer.weight
    torch.testing.assert_close(layer.estimator.weight(layer, w), layer.w_quant.hard(w))


def test_clipped_ste_gradient_equals_hardtanh_derivative():
    torch.manual_seed(1)
    est = ClippedSTE(clip=1.0)
    layer = _layer(est, bits=1)  # BinaryNet's window applies to 2-level grids
    x = torch.randn(64, 16) * 2
    x = torch.where((x.abs() - 1).abs() < 1e-3, x + 0.01, x)  # keep away from the kinks
    x.requires_grad_(True)
    layer.a_quant.observe(x.detach())
    g = torch.randn_like(x)
    (est.activation(layer, x) * g).sum().backward()
    x_ref = x.detach().clone().requires_grad_(True)
    (torch.nn.functional.hardtanh(x_ref) * g).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)
    # forward value is still the hard quantizer's
    torch.testing.assert_close(est.activation(layer, x), layer.a_quant.hard(x))


def test_clipped_ste_clamps_latent_weights_after_step():
    est = ClippedSTE(clip=1.0, clip_weights=True)
    layer = _layer(est)
    with torch.no_grad():
        layer.weight.mul_(10)
    est.after_optimizer_step()
    assert layer.weight.abs().max() <= 1.0


def _window_grads(est, bits, x, activation_range):
    """Input gradient of a 1-unit-upstream pass through a layer with an unsigned input grid."""
    layer = QLinear.from_float(
        nn.Linear(x.shape[1], 3),
        UniformQuantizer(bits, "weight"),
        UniformQuantizer(bits, "activation", signed=False, scale_method="max_abs"),
        "body",
    )
    keep_reference(layer, "estimator", est)
    layer.a_quant.observe(torch.full((1, 1), activation_range))  # range = activation_range
    xg = x.clone().requires_grad_(True)
    est.activation(layer, xg).sum().backward()
    return xg.grad


@pytest.mark.parametrize("bits", [2, 4])
def test_clipped_ste_passes_gradients_over_the_whole_multibit_grid(bits):
    r = 3.0
    x = torch.tensor([[-0.5, -0.1, 0.0, 0.4, 0.99, 1.01, 1.7, 2.9, 3.0, 3.2, 4.0]])
    # closed form of the window: the outermost levels 0 and r plus half a step
    half = r / (2**bits - 1) / 2
    want = ((x >= -half) & (x <= r + half)).float()
    grad = _window_grads(ClippedSTE(clip=1.0), bits, x, r)
    torch.testing.assert_close(grad, want)
    assert grad[0, 6] == 1.0  # 1.7 still lands on a distinct level: it gets its gradient
    # the old behaviour stays available: |x| <= clip whatever the grid
    old = _window_grads(ClippedSTE(clip=1.0, multibit="clip"), bits, x, r)
    torch.testing.assert_close(old, (x.abs() <= 1.0).float())


def test_clipped_ste_window_of_learned_quantizers_needs_no_grid():
    from qexp.quant.dq import DQPow2P3Quantizer, DQU3Quantizer

    est = ClippedSTE()
    u3 = DQU3Quantizer(4, "weight")
    w = torch.linspace(-1, 1, 101)
    u3.observe(w)  # calibrates: q_max = 1, d = 1 / 7
    lo, hi = u3.clip_window(w)
    assert float(lo) == pytest.approx(-1 - 1 / 14) and float(hi) == pytest.approx(1 + 1 / 14)
    p2 = DQPow2P3Quantizer(4, "weight")
    p2.observe(w)
    lo, hi = p2.clip_window(w)
    assert float(hi) == pytest.approx(2**0.5) and float(lo) == pytest.approx(-(2**0.5))
    est.check_quantizer("weight", p2)  # no grid needed: accepted
