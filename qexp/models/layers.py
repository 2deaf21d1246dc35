"""Building blocks shared by the model definitions."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from qexp.errors import QexpError

ACTIVATIONS = ("relu", "hardtanh")


def make_activation(name: str) -> nn.Module:
    """Return a fresh activation module for ``name``.

    ``"relu"`` gives ``nn.ReLU``; ``"hardtanh"`` gives ``nn.Hardtanh(-1, 1)`` (a signed activation,
    as BinaryNet-style nets need before sign binarization). Never in-place, so forward hooks and
    quantizers see the tensors a layer really produced.
    """
    key = str(name).lower()
    if key == "relu":
        return nn.ReLU()
    if key == "hardtanh":
        return nn.Hardtanh(-1.0, 1.0)
    raise QexpError(
        f"unknown activation {name!r}; set model.activation to one of: {', '.join(ACTIVATIONS)}"
    )


def conv_bn_act(
    in_channels: int,
    out_channels: int,
    activation: str,
    kernel_size: int = 3,
    stride: int = 1,
    pool: bool = False,
) -> nn.Sequential:
    """Conv (no bias, 'same' padding) -> [MaxPool2d(2)] -> BatchNorm -> activation.

    With ``pool=True`` the 2x2 max pool sits between the conv and the BatchNorm (the BinaryNet
    order): pooling happens before the activation is binarized, and BN/activation run on 4x
    fewer elements.
    """
    layers: list[nn.Module] = [
        nn.Conv2d(
            in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2,
            bias=False,
        )
    ]
    if pool:
        layers.append(nn.MaxPool2d(2))
    layers += [nn.BatchNorm2d(out_channels), make_activation(activation)]
    return nn.Sequential(*layers)


def init_weights(model: nn.Module) -> None:
    """He-normal init for convs, unit/zero BatchNorm; Linear layers keep PyTorch's default."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def check_positive(name: str, value: int) -> int:
    """Return ``int(value)``, raising a QexpError unless it is a positive integer."""
    if int(value) != value or int(value) < 1:
        raise QexpError(f"model.{name} must be a positive integer, got {value!r}")
    return int(value)


class MatMul(nn.Module):
    """``a @ b`` as a module: attention's activation-activation products (``q k^T`` and
    ``attention @ v``) go through it, so the wrapper can quantize both inputs
    (``layers.matmul_bits`` swaps it for qexp.quant.layers.QMatMul)."""

    #: qexp's wrapper quantizes both inputs of this product when ``layers.matmul_bits`` is set
    quantizable_product = True

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        return torch.matmul(a, b)
