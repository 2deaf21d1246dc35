"""Turn a float model into a quantized one by swapping its Conv2d/Linear layers in place."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from qexp.quant.base import Quantizer
from qexp.quant.layers import QConv2d, QLinear, QuantLayer

#: Builds a quantizer for (role, bits); returns None for 32 bits (full precision).
QuantizerFactory = Callable[[str, int], Quantizer | None]


@dataclass
class LayerBits:
    """Bit widths of one layer's weight and input activation (32 = full precision)."""

    w_bits: int
    a_bits: int


def _swap(parent: nn.Module, name: str, new: nn.Module) -> None:
    setattr(parent, name, new)


def quantize_model(
    net: nn.Module,
    body: QuantizerFactory,
    edge: QuantizerFactory,
    body_bits: LayerBits,
    first_bits: int | None,
    last_bits: int | None,
) -> list[str]:
    """Replace every nn.Conv2d / nn.Linear of ``net`` by its quantized counterpart.

    The first and last such layers (in registration order) are "edge" layers: when
    ``first_bits`` / ``last_bits`` is given they use it for weight and input, with the ``edge``
    quantizer and plain STE; ``None`` treats them like every other layer.

    Returns the names of the swapped layers, in order.
    """
    names = [n for n, m in net.named_modules() if type(m) in (nn.Conv2d, nn.Linear)]
    for i, name in enumerate(names):
        module = net.get_submodule(name)
        role = "first" if i == 0 else "last" if i == len(names) - 1 else "body"
        edge_bits = first_bits if role == "first" else last_bits if role == "last" else None
        if edge_bits is not None:
            wq, aq = edge("weight", edge_bits), edge("activation", edge_bits)
        else:
            role = "body"
            wq, aq = body("weight", body_bits.w_bits), body("activation", body_bits.a_bits)
        cls = QConv2d if isinstance(module, nn.Conv2d) else QLinear
        new = cls.from_float(module, wq, aq, role)
        parent_name, _, attr = name.rpartition(".")
        _swap(net.get_submodule(parent_name) if parent_name else net, attr, new)
    return names


def attach_estimator(net: nn.Module, estimator: nn.Module) -> None:
    """Point every body layer's training forward at ``estimator`` (edge layers keep STE)."""
    for m in net.modules():
        if isinstance(m, QuantLayer):
            m.__dict__["estimator"] = estimator if m.layer_role == "body" else None
