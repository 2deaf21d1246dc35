"""STE and clipped STE gradients against autograd of the identity and of hardtanh."""

import torch
from torch import nn

from qexp.estimators.clipped_ste import ClippedSTE
from qexp.estimators.ste import STE
from qexp.quant.layers import QLinear
from qexp.quant.uniform import UniformQuantizer


def _layer(estimator, bits=2):
    lin = nn.Linear(16, 4)
    layer = QLinear.from_float(
        lin,
        UniformQuantizer(bits, "weight"),
        UniformQuantizer(bits, "activation", signed=True),
        "body",
    )
    layer.__dict__["estimator"] = estimator
    estimator.__dict__["model"] = nn.Sequential(layer)
    return layer


def test_ste_weight_and_activation_gradients_are_identity():
    torch.manual_seed(0)
    layer = _layer(STE())
    w = layer.weight.detach().clone().requires_grad_(True)
    x = torch.randn(32, 16, requires_grad=True)
    g = torch.randn(4, 16)
    est = layer.__dict__["estimator"]
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
    torch.testing.assert_close(layer.__dict__["estimator"].weight(layer, w), layer.w_quant.hard(w))


def test_clipped_ste_gradient_equals_hardtanh_derivative():
    torch.manual_seed(1)
    est = ClippedSTE(clip=1.0)
    layer = _layer(est)
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
