"""Declared protocols: plain references between modules, and the wrapping-estimator seams."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qexp.errors import QexpError
from qexp.estimators.aqe import AQE
from qexp.estimators.base import EstimatorContext
from qexp.estimators.block_replace import BlockReplace
from qexp.estimators.compat import check_pairing
from qexp.estimators.wrapping import WrappingEstimator
from qexp.quant.dq import DQPow2P3Quantizer
from qexp.quant.layers import QLinear
from qexp.quant.refs import keep_reference
from qexp.quant.uniform import UniformQuantizer


def test_keep_reference_stays_out_of_the_module_tree():
    layer = QLinear.from_float(nn.Linear(3, 2), UniformQuantizer(2, "weight"), None, "body")
    est = AQE()
    keep_reference(layer, "estimator", est)
    assert layer.estimator is est
    assert est not in list(layer.modules())
    assert set(layer.state_dict()) == {"weight", "bias", *(f"w_quant.{k}" for k in
                                       layer.w_quant.state_dict())}


class _Recording(AQE):
    """An AQE that records which seams were called (to see the wrapper delegate)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def weight(self, layer, w):
        self.calls.append("weight")
        return super().weight(layer, w)

    def step(self, progress):
        self.calls.append("step")
        return super().step(progress)


def test_wrapping_estimator_delegates_the_layer_seams_to_its_base():
    base = _Recording()
    wrap = WrappingEstimator(base)
    layer = QLinear.from_float(nn.Linear(4, 3), UniformQuantizer(2, "weight"), None, "body")
    keep_reference(layer, "estimator", wrap)
    wrap.attach(nn.Sequential(layer), EstimatorContext(total_steps=10, device=torch.device("cpu")))
    assert wrap.model is base.model
    wrap.step(0.5)
    w = layer.weight
    torch.testing.assert_close(wrap.weight(layer, w), base.weight(layer, w))
    assert base.calls == ["step", "weight", "weight"]
    assert wrap.has_soft_forward == base.has_soft_forward
    assert wrap.state_summary() == base.state_summary()


def test_block_replace_checks_its_base_against_the_quantizer():
    pow2 = DQPow2P3Quantizer(4, "weight")
    check_pairing(BlockReplace(), pow2, None)  # STE base: any quantizer
    with pytest.raises(QexpError, match="estimator=aqe needs a uniform grid"):
        check_pairing(BlockReplace(base=AQE()), pow2, None)
    with pytest.raises(QexpError, match="cannot itself need a partner"):
        BlockReplace(base=BlockReplace())
