"""XNOR + popcount computation of binarized layers against the float computation."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qexp.quant.binary import BinaryQuantizer
from qexp.quant.layers import QConv2d, QLinear
from qexp.quant.refs import keep_reference
from qexp.quant.xnor import pack_bits, popcount, xnor_conv2d, xnor_layer_forward, xnor_linear


def _sign(t: torch.Tensor) -> torch.Tensor:
    return torch.where(t >= 0, 1.0, -1.0)  # sign(0) = +1, as BinaryQuantizer


def test_pack_and_popcount():
    bits = torch.tensor([[1, 0, 1, 1, 0, 0, 0, 1, 1, 1]], dtype=torch.bool)
    words = pack_bits(bits)
    assert words.dtype == torch.uint8 and words.shape == (1, 2)
    assert words.tolist() == [[0b10110001, 0b11000000]]
    assert popcount(words).sum().item() == int(bits.sum())


@pytest.mark.parametrize("n", [1, 7, 8, 61, 200])
def test_xnor_linear_equals_float(n):
    torch.manual_seed(n)
    x, w = torch.randn(5, n), torch.randn(3, n)
    x[0, 0] = 0.0  # zero goes to +1 on both paths
    alpha = w.abs().mean(dim=1)
    # the integer part is exact: +-1 dot products are small integers in float32
    ints = xnor_linear(x, w, torch.ones(3))
    assert torch.equal(ints, F.linear(_sign(x), _sign(w)))
    ref = F.linear(0.5 * _sign(x), _sign(w) * alpha[:, None])
    torch.testing.assert_close(xnor_linear(x, w, alpha, act_scale=0.5), ref)


@pytest.mark.parametrize("stride,padding", [(1, 0), (1, 1), (2, 1)])
def test_xnor_conv_equals_float(stride, padding):
    torch.manual_seed(0)
    x, w = torch.randn(2, 3, 7, 6), torch.randn(4, 3, 3, 3)
    ints = xnor_conv2d(x, w, torch.ones(4), stride=stride, padding=padding)
    ref = F.conv2d(_sign(x), _sign(w), stride=stride, padding=padding)
    assert torch.equal(ints, ref)


def test_xnor_matches_deployed_binary_layers():
    torch.manual_seed(1)
    lin = QLinear.from_float(
        nn.Linear(50, 6), BinaryQuantizer(1, "weight"), BinaryQuantizer(1, "activation"), "body"
    )
    conv = QConv2d.from_float(
        nn.Conv2d(3, 5, 3, padding=1, bias=False),
        BinaryQuantizer(1, "weight"),
        BinaryQuantizer(1, "activation"),
        "body",
    )
    lin.eval()
    conv.eval()
    x = torch.randn(4, 50)
    torch.testing.assert_close(xnor_layer_forward(lin, x), lin(x))
    xc = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(xnor_layer_forward(conv, xc), conv(xc))


def _meta_net_layers():
    """1-bit body layers trained by the QuantNet-style estimator, its meta net moved off its
    residual start (as after training), so its deployed signs differ from sign(w)."""
    from qexp.estimators.base import EstimatorContext
    from qexp.estimators.quantnet import QuantNet

    torch.manual_seed(3)
    lin = QLinear.from_float(
        nn.Linear(40, 6), BinaryQuantizer(1, "weight"), BinaryQuantizer(1, "activation"), "body"
    )
    conv = QConv2d.from_float(
        nn.Conv2d(3, 5, 3, padding=1),
        BinaryQuantizer(1, "weight"),
        BinaryQuantizer(1, "activation"),
        "body",
    )
    est = QuantNet(gamma=2.0, hidden=8)
    holder = nn.ModuleList([lin, conv])
    for m in holder:
        keep_reference(m, "estimator", est)
    est.attach(holder, EstimatorContext(total_steps=10, device=torch.device("cpu")))
    with torch.no_grad():
        est.w_out.normal_(0.0, 0.8)
        est.b_out.normal_(0.0, 0.3)
    holder.eval()
    return lin, conv


def test_xnor_uses_the_deployed_weights_of_a_meta_quantizer():
    lin, conv = _meta_net_layers()
    flips = sum(
        int((_sign(m.deployed_weight()) != _sign(m.weight.detach())).sum()) for m in (lin, conv)
    )
    assert flips > 0  # sign(w) would be the wrong network
    x = torch.randn(4, 40)
    torch.testing.assert_close(xnor_layer_forward(lin, x), lin(x))
    xc = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(xnor_layer_forward(conv, xc), conv(xc))


@pytest.mark.parametrize("padding", [0, 1])
def test_and_popcount_runs_one_bit_relu_layers(padding):
    from qexp.quant.uniform import UniformQuantizer

    torch.manual_seed(padding)
    layers = [
        QLinear.from_float(
            nn.Linear(37, 5),
            UniformQuantizer(1, "weight"),
            UniformQuantizer(1, "activation"),
            "body",
        ),
        QConv2d.from_float(
            nn.Conv2d(3, 4, 3, padding=padding),
            UniformQuantizer(1, "weight"),
            UniformQuantizer(1, "activation"),
            "body",
        ),
    ]
    inputs = [torch.relu(torch.randn(6, 37)), torch.relu(torch.randn(2, 3, 7, 7))]
    for layer, x in zip(layers, inputs, strict=True):
        layer.a_quant.observe(x)  # inputs {0, r} after ReLU: an unsigned 2-level grid
        layer.eval()
        assert torch.unique(layer.a_quant.hard(x)).numel() == 2
        assert float(layer.a_quant.hard(x).min()) == 0.0
        torch.testing.assert_close(xnor_layer_forward(layer, x), layer(x))


def test_bit_inference_refuses_multibit_layers():
    from qexp.quant.uniform import UniformQuantizer

    layer = QLinear.from_float(
        nn.Linear(8, 3), UniformQuantizer(2, "weight"), UniformQuantizer(1, "activation"), "body"
    )
    layer.eval()
    with pytest.raises(ValueError, match="per output channel"):
        xnor_layer_forward(layer, torch.relu(torch.randn(2, 8)))
