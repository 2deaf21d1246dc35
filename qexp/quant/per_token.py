"""Dynamic absmax quantization with one scale per token (BitNet's 8-bit activations).

Activations: every token (a row along the last dim) gets its own scale
``max|x| / Q_P`` with ``Q_P = 2^(b-1) - 1`` (127 at 8 bits), so the grid is
``-Q_P .. Q_P`` steps (``2^b - 1`` levels, zero included). Weights: the same with one scale per
output channel (dim 0). Nothing is calibrated: the scales come from the tensor at hand.
Training forward: straight-through.

For 4-D convolution inputs the "token" is a row along the width; the scheme is meant for the
(B, T, C) inputs of transformer Linear layers.
"""

from __future__ import annotations

from torch import Tensor

from qexp.quant.base import Grid, Quantizer, channel_view

#: keeps the scale of an all-zero token positive
EPS = 1e-5


class PerTokenQuantizer(Quantizer):
    """Symmetric absmax quantizer: per token (activations) or per output channel (weights).

    Args:
        bits: bit width (at least 2: the grid is symmetric around a zero level).
        role: ``"weight"`` or ``"activation"``.
    """

    #: the layer table counts distinct activation values per token (one grid per token)
    per_token = True

    def __init__(self, bits: int = 8, role: str = "activation") -> None:
        self._check_ternary(bits, role)
        if bits < 2:
            raise ValueError(f"per-token absmax needs at least 2 bits, got bits={bits}")
        super().__init__(bits, role)
        self.q_p = 2 ** (int(bits) - 1) - 1
        self.per_token = role == "activation"

    def scale(self, x: Tensor) -> Tensor:
        """``max|x| / Q_P`` per token (last dim) or per output channel, broadcastable."""
        x = x.detach()
        if self.role == "activation":
            amax = x.abs().amax(dim=-1, keepdim=True)
        else:
            amax = channel_view(x.abs().reshape(x.shape[0], -1).amax(dim=1), x, True)
        return amax.clamp(min=EPS) / self.q_p

    def grid(self, x: Tensor) -> Grid:
        return Grid(offset=-float(self.q_p), step=self.scale(x), num_levels=2 * self.q_p + 1)

    def extra_repr(self) -> str:
        per = "token" if self.role == "activation" else "output channel"
        return f"bits={self.bits}, role={self.role}, absmax per {per}"
