"""Binary quantizer: sign(w) times mean |w| per output channel; activations sign(x)."""

from __future__ import annotations

import torch
from torch import Tensor

from qexp.quant.base import Grid, Quantizer, channel_view


class BinaryQuantizer(Quantizer):
    """1-bit quantizer (BinaryNet / XNOR-Net style).

    Weights map to ``+-mean|w|`` (per output channel, or per tensor); activations map to
    ``+-act_scale``. Zero maps to the positive level, matching BinaryNet's sign.

    Args:
        bits: must be 1.
        role: ``"weight"`` or ``"activation"``.
        per_channel: one scale per output channel for weights.
        act_scale: magnitude of binarized activations.
    """

    def __init__(
        self, bits: int = 1, role: str = "weight", per_channel: bool = True, act_scale: float = 1.0
    ) -> None:
        self._check_ternary(bits, role)
        if bits != 1:
            raise ValueError(f"the binary quantizer has 1 bit, got bits={bits}")
        super().__init__(1, role)
        self.per_channel = per_channel and role == "weight"
        self.act_scale = act_scale

    def magnitude(self, x: Tensor) -> Tensor:
        """The level magnitude ``a`` (levels are -a and +a), broadcastable against ``x``."""
        if self.role == "activation":
            return torch.tensor(self.act_scale, device=x.device, dtype=x.dtype)
        x = x.detach()
        if self.per_channel:
            return channel_view(x.abs().reshape(x.shape[0], -1).mean(dim=1), x, True)
        return x.abs().mean()

    def grid(self, x: Tensor) -> Grid:
        a = self.magnitude(x)
        return Grid(offset=-0.5, step=2 * a, num_levels=2)

    def hard(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            a = self.magnitude(x)
            return torch.where(x >= 0, a, -a).to(x.dtype)
