"""Multi-layer perceptron on flattened images."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from qexp.errors import QexpError
from qexp.models.layers import make_activation


def _hidden_group(
    in_features: int, out_features: int, activation: str, dropout: float
) -> nn.Sequential:
    """Linear (no bias) - BatchNorm1d - activation [- dropout]."""
    layers: list[nn.Module] = [
        nn.Linear(in_features, out_features, bias=False),
        nn.BatchNorm1d(out_features),
        make_activation(activation),
    ]
    if dropout > 0:
        layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


class MLP(nn.Module):
    """Flatten -> hidden groups (Linear-BN-act[-dropout]) -> Linear classifier.

    The first hidden group (after flattening) is the stem; the remaining hidden groups are
    the blocks (``blocks.0``, ``blocks.1``, ...); the final Linear is the head. With one hidden
    layer ``block_names()`` is empty; with none the model is a linear classifier.
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int,
        image_size: int,
        hidden: Sequence[int] = (256, 256),
        activation: str = "relu",
        dropout: float = 0.0,
        name: str | None = None,
    ) -> None:
        super().__init__()
        sizes = [int(h) for h in (hidden or ())]
        if any(h < 1 for h in sizes):
            raise QexpError(f"model.hidden must list positive layer sizes, got {list(hidden)}")
        if not 0.0 <= float(dropout) < 1.0:
            raise QexpError(f"model.dropout must be in [0, 1), got {dropout}")
        features = in_channels * image_size * image_size
        stem: list[nn.Module] = [nn.Flatten()]
        if sizes:
            stem += list(_hidden_group(features, sizes[0], activation, float(dropout)))
            features = sizes[-1]
        self.stem = nn.Sequential(*stem)
        pairs = zip(sizes[:-1], sizes[1:], strict=True)
        self.blocks = nn.Sequential(
            *(_hidden_group(a, b, activation, float(dropout)) for a, b in pairs)
        )
        self.fc = nn.Linear(features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.blocks(x)
        return self.fc(x)

    def block_names(self) -> list[str]:
        """Dotted names of the main blocks, in forward order."""
        return [f"blocks.{i}" for i in range(len(self.blocks))]
