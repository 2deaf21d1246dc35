"""Ternary weights by absmean scaling (BitNet b1.58, Ma et al. 2024).

``scale = mean|W| + eps`` and ``W_q = clip(round(W / scale), -1, 1) * scale``: three levels
``{-scale, 0, +scale}`` (log2 3 = 1.58 bits, stored in 2). The scale is one per tensor as in the
paper, or one per output row (``per_row``). Training forward: straight-through (the scale is a
statistic of the weights, not a learned parameter, and gets no gradient).

A ternary layer runs at ``w_bits=1.58`` (``w_bits=2`` is kept as an alias: same grid, same
numbers); either way it is stored, sized and budgeted at 2 bits per weight (qexp.bitwidth) and
the level check allows 3 values.
"""

from __future__ import annotations

from torch import Tensor

from qexp.bitwidth import is_ternary
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
        bits: 1.58 (three levels), or its alias 2 (the two bits they are stored in).
        role: ``"weight"`` (the paper's use) or ``"activation"``.
        per_row: one scale per output channel (dim 0) instead of one per tensor.
    """

    def __init__(self, bits: float = 1.58, role: str = "weight", per_row: bool = False) -> None:
        if not (is_ternary(bits) or (bits == 2 and isinstance(bits, int))):
            raise ValueError(
                f"the ternary quantizer has 3 levels: use w_bits=1.58 (or its alias 2), got {bits}"
            )
        super().__init__(bits, role)
        self.ternary = True  # the alias bits=2 is ternary too
        self.per_row = bool(per_row) and role == "weight"

    def accepts_ternary(self, role: str) -> bool:
        return True

    def grid(self, x: Tensor) -> Grid:
        return Grid(offset=-1.0, step=absmean_scale(x, self.per_row), num_levels=3)

    def extra_repr(self) -> str:
        return f"bits=1.58 (ternary, 2 stored), role={self.role}, per_row={self.per_row}"
