"""Ternary weights by absmean scaling (BitNet b1.58, Ma et al. 2024).

``scale = mean|W| + eps`` and ``W_q = clip(round(W / scale), -1, 1) * scale``: three levels
``{-scale, 0, +scale}`` (log2 3 = 1.58 bits, stored in 2). The scale is one per tensor as in the
paper, or one per output row (``per_row``). Training forward: straight-through (the scale is a
statistic of the weights, not a learned parameter, and gets no gradient).

qexp's bit widths are integers: a ternary layer runs at ``w_bits=2`` (its 3 levels fit the
2-bit level check; the packed-size report counts 2 bits per weight).
"""

from __future__ import annotations

from torch import Tensor

from qexp.quant.base import Grid, Quantizer, channel_view

#: keeps the scale of an all-zero tensor positive
EPS = 1e-5


def absmean_scale(x: Tensor, per_row: bool) -> Tensor:
    """``mean|x| + eps`` per tensor, or per row (dim 0) shaped to broadcast against ``x``."""
    x = x.detach()
    if per_row:
        return channel_view(x.abs().reshape(x.shape[0], -1).mean(dim=1) + EPS, x, True)
    return x.abs().mean() + EPS


class TernaryQuantizer(Quantizer):
    """BitNet b1.58 absmean ternary quantizer.

    Args:
        bits: must be 2 (three levels need two bits of storage).
        role: ``"weight"`` (the paper's use) or ``"activation"``.
        per_row: one scale per output channel (dim 0) instead of one per tensor.
    """

    def __init__(self, bits: int = 2, role: str = "weight", per_row: bool = False) -> None:
        if bits != 2:
            raise ValueError(
                f"the ternary quantizer stores 3 levels in 2 bits: use w_bits=2, got bits={bits}"
            )
        super().__init__(bits, role)
        self.per_row = bool(per_row) and role == "weight"

    def grid(self, x: Tensor) -> Grid:
        return Grid(offset=-1.0, step=absmean_scale(x, self.per_row), num_levels=3)

    def extra_repr(self) -> str:
        return f"bits={self.bits} (ternary), role={self.role}, per_row={self.per_row}"
