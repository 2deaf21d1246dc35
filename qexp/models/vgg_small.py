"""VGG-small: the BinaryNet / LQ-Nets CIFAR network used by 1-bit papers."""

from __future__ import annotations

import torch
from torch import nn

from qexp.errors import QexpError
from qexp.models.layers import check_positive, conv_bn_act, init_weights, make_activation


class VGGSmall(nn.Module):
    """2x128C3-MP2-2x256C3-MP2-2x512C3-MP2-[2x FC]-classifier, channels scaled by width/128.

    Every conv is followed by BatchNorm and the activation; the max pools sit between conv and
    BN (BinaryNet order). stem = the first conv; blocks = ``stage1`` (second 128-channel conv
    + pool), ``stage2`` and ``stage3`` (two convs + pool each); head = flatten -> optional
    ``fc_hidden`` Linear-BN-act layers (BinaryNet uses two of 1024) -> Linear(num_classes).
    The flattened size follows image_size (512*4*4 at 32, 512*3*3 at 28); image_size >= 8.
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int,
        image_size: int,
        width: int = 128,
        activation: str = "relu",
        fc_hidden: int | None = None,
        name: str | None = None,
    ) -> None:
        super().__init__()
        w = check_positive("width", width)
        if int(image_size) < 8:
            raise QexpError(f"VGGSmall needs image_size >= 8 (three 2x2 pools), got {image_size}")
        self.stem = conv_bn_act(in_channels, w, activation)
        self.stage1 = conv_bn_act(w, w, activation, pool=True)
        self.stage2 = nn.Sequential(
            *conv_bn_act(w, 2 * w, activation),
            *conv_bn_act(2 * w, 2 * w, activation, pool=True),
        )
        self.stage3 = nn.Sequential(
            *conv_bn_act(2 * w, 4 * w, activation),
            *conv_bn_act(4 * w, 4 * w, activation, pool=True),
        )
        side = int(image_size) // 2 // 2 // 2
        features = 4 * w * side * side
        head: list[nn.Module] = [nn.Flatten()]
        if fc_hidden is not None:
            h = check_positive("fc_hidden", fc_hidden)
            for i in range(2):
                head += [
                    nn.Linear(features if i == 0 else h, h, bias=False),
                    nn.BatchNorm1d(h),
                    make_activation(activation),
                ]
            features = h
        head.append(nn.Linear(features, num_classes))
        self.classifier = nn.Sequential(*head)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.stage3(self.stage2(self.stage1(x)))
        return self.classifier(x)

    def block_names(self) -> list[str]:
        """Dotted names of the three conv stages, in forward order."""
        return ["stage1", "stage2", "stage3"]
