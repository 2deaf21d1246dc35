"""QConv2d / QLinear.from_float: built by the constructor, sharing the float layer's state."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qexp.quant.layers import QConv2d, QLinear
from qexp.quant.uniform import UniformQuantizer


def _float_layers() -> list[nn.Module]:
    return [
        nn.Conv2d(3, 6, 3, stride=2, padding=1, dilation=1, groups=3, bias=False),
        nn.Conv2d(4, 4, 3, padding="same", padding_mode="reflect"),
        nn.Linear(5, 7),
        nn.Linear(5, 7, bias=False),
    ]


@pytest.mark.parametrize("layer", _float_layers(), ids=lambda m: repr(m))
def test_from_float_shares_parameters_and_draws_nothing_from_the_rng(layer: nn.Module) -> None:
    layer.tag = "set by the model"
    layer.register_buffer("scratch", torch.arange(3.0), persistent=False)
    layer.eval()
    cls = QConv2d if isinstance(layer, nn.Conv2d) else QLinear
    before = torch.random.get_rng_state()
    q = cls.from_float(layer, None, None, "body")
    assert torch.equal(before, torch.random.get_rng_state())
    assert q.weight is layer.weight
    assert q.bias is layer.bias
    assert q.scratch is layer.scratch
    assert list(q.state_dict()) == list(layer.state_dict())
    assert q.tag == "set by the model" and not q.training
    assert all(p.device.type == "cpu" for p in q.parameters())
    shape = (2, layer.in_channels, 8, 8) if isinstance(layer, nn.Conv2d) else (2, 5)
    x = torch.randn(shape)
    q.mode = "off"
    assert torch.equal(q(x), layer(x))


def test_from_float_keeps_hooks_and_quantizes() -> None:
    layer = nn.Linear(4, 3)
    seen = []
    layer.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    wq = UniformQuantizer(2, "weight")
    q = QLinear.from_float(layer, wq, None, "body")
    q.eval()
    x = torch.randn(2, 4)
    out = q(x)
    assert seen == [torch.Size([2, 3])]
    expected = torch.nn.functional.linear(x, wq.hard(layer.weight), layer.bias)
    assert torch.equal(out, expected)
