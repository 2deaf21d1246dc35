"""The quantized model container: the wrapped network plus the estimator that trains it."""

from __future__ import annotations

from torch import Tensor, nn

from qexp.estimators.base import Estimator
from qexp.quant.layers import QuantLayer, quant_layers


class QuantModel(nn.Module):
    """``net`` with quantized layers, and the ``estimator`` that owns its training forward.

    Both are submodules, so one state_dict checkpoints the network, the quantizers' state and
    the estimator's parameters and buffers together.
    """

    def __init__(self, net: nn.Module, estimator: Estimator) -> None:
        super().__init__()
        self.net = net
        self.estimator = estimator

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def layers(self) -> list[tuple[str, QuantLayer]]:
        """Quantized layers of the network with their names, in order."""
        return quant_layers(self.net)
