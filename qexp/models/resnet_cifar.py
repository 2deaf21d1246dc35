"""CIFAR-style ResNet (He et al. 2016): ResNet-20/32/44/56/110."""

from __future__ import annotations

import torch
from torch import nn

from qexp.errors import QexpError
from qexp.models.layers import check_positive, init_weights, make_activation


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers plus a shortcut; the activation follows the addition.

    The shortcut is the identity, or a 1x1 conv + BN when the shape changes (option B).
    Layers are registered (and run) in the order conv1, conv2, shortcut.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, activation: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.act1 = make_activation(activation)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )
        self.act2 = make_activation(activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.act2(out + self.shortcut(x))


class ResNet20(nn.Module):
    """CIFAR ResNet: 3x3 stem, 3 stages of n = (depth - 2) / 6 BasicBlocks, pool, linear.

    Stage widths are width, 2*width, 4*width; stages 2 and 3 start with stride 2. ``depth``
    selects ResNet-20/32/44/56/110. Blocks: ``layer1.0`` ... ``layer3.{n-1}``. Works for any
    image_size >= 8 (global average pooling before the classifier).
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int,
        image_size: int,
        width: int = 16,
        depth: int = 20,
        activation: str = "relu",
        name: str | None = None,
    ) -> None:
        super().__init__()
        w = check_positive("width", width)
        if int(depth) < 8 or (int(depth) - 2) % 6 != 0:
            raise QexpError(
                f"model.depth must be 6n+2 with n >= 1 (20, 32, 44, 56, 110), got {depth}"
            )
        n = (int(depth) - 2) // 6
        self.conv1 = nn.Conv2d(in_channels, w, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(w)
        self.act = make_activation(activation)
        self.layer1 = self._stage(w, w, n, 1, activation)
        self.layer2 = self._stage(w, 2 * w, n, 2, activation)
        self.layer3 = self._stage(2 * w, 4 * w, n, 2, activation)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * w, num_classes)
        self._num_blocks = n
        init_weights(self)

    @staticmethod
    def _stage(
        in_channels: int, out_channels: int, n: int, stride: int, activation: str
    ) -> nn.Sequential:
        blocks = [BasicBlock(in_channels, out_channels, stride, activation)]
        blocks += [BasicBlock(out_channels, out_channels, 1, activation) for _ in range(n - 1)]
        return nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.pool(x), 1))

    def block_names(self) -> list[str]:
        """Dotted names of the BasicBlocks, in forward order."""
        return [f"layer{s}.{i}" for s in (1, 2, 3) for i in range(self._num_blocks)]
