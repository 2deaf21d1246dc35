"""Stretched elastic quantization (SEQ, ParetoQ: Liu et al. 2025) for 1.58-, 2- and k-bit weights.

A learned clip ``alpha`` (one per output row, or per tensor) spans ``[-alpha, alpha]``, which is
cut into ``n`` equal bins; every bin's value is its centre, so the levels are
``alpha * (2k + 1 - n) / n`` for ``k = 0 .. n-1``: ternary (``n = 3``) gives
``{-2/3, 0, 2/3} * alpha``, 2 bits (``n = 4``) ``{-3/4, -1/4, 1/4, 3/4} * alpha``. Every level
has an equal share of the range ("stretched"), unlike a grid whose end levels sit at the clip.

Gradients (LSQ-style, ``u = w / alpha``, ``L(u)`` the level as a fraction of alpha): inside
``|u| < 1`` the weight gets the gradient unchanged and alpha gets ``L(u) - u``; outside the weight
gets none and alpha gets ``L(u) = +-(n-1)/n``, the end level. alpha's gradient is scaled by
``1 / sqrt(N)`` (N: weights sharing that alpha). ParetoQ's reference code clips at 0.99 alpha and
uses +-1 beyond the range for ternary; qexp takes the exact derivative above.

alpha starts at each row's max |w| (the first forward, after ``init_from``) and trains in the
optimizer group "quantizer". Ternary SEQ is ``bits=1.58`` (ParetoQ's code spells it
``w_bits=0``); the older spelling ``bits=2`` with ``ternary: true`` builds the same quantizer.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from qexp.bitwidth import is_ternary
from qexp.quant.base import Grid, Quantizer, channel_view
from qexp.quant.lsq import grad_scale

#: keeps a clip positive
EPS = 1e-5


class SEQQuantizer(Quantizer):
    """Stretched elastic weight quantizer with a learned clip per output row.

    Args:
        bits: bit width; ``2 ** bits`` levels, or 3 at ``1.58`` (ternary).
        role: must be ``"weight"``.
        ternary: three levels at ``bits=2`` (the older spelling of ``bits=1.58``).
        per_row: one clip per output channel (dim 0), else one per tensor.
        grad_scale: scale alpha's gradient by ``1 / sqrt(N)``.
    """

    def __init__(
        self,
        bits: float = 2,
        role: str = "weight",
        ternary: bool = False,
        per_row: bool = True,
        grad_scale: bool = True,
    ) -> None:
        if role != "weight":
            raise ValueError("SEQ quantizes weights only; pick another activation quantizer")
        if ternary and not (bits == 2 or is_ternary(bits)):
            raise ValueError(f"ternary SEQ has 3 levels: use w_bits=1.58, got {bits}")
        super().__init__(bits, role)
        self.ternary = self.ternary or bool(ternary)
        self.num_levels = 3 if self.ternary else 2 ** int(bits)
        self.per_row = bool(per_row)
        self.use_grad_scale = bool(grad_scale)
        self.alpha = nn.Parameter(torch.ones(()))
        self._register_calibration("initialized")

    def accepts_ternary(self, role: str) -> bool:
        return True

    def bind_weight(self, weight: Tensor) -> None:
        """Size alpha for ``weight`` (one per output row): called when the layer is wrapped,
        before the optimizer collects the parameters."""
        if self.per_row:
            self.alpha = nn.Parameter(torch.ones(weight.shape[0], device=weight.device))

    def _alpha(self, like: Tensor) -> Tensor:
        return channel_view(self.alpha, like, self.per_row)

    @torch.no_grad()
    def observe(self, x: Tensor) -> None:
        """Calibration: alpha = max |w| per row (or of the tensor), once."""
        if self.is_calibrated():
            return
        w = x.detach()
        amax = w.abs().reshape(w.shape[0], -1).amax(dim=1) if self.per_row else w.abs().max()
        self.alpha.copy_(amax.clamp(min=EPS).reshape(self.alpha.shape))
        self._set_calibrated()

    def grid(self, x: Tensor) -> Grid:
        self._require_calibrated()
        n = self.num_levels
        return Grid(offset=-(n - 1) / 2, step=self._alpha(x) * (2.0 / n), num_levels=n)

    def forward(self, x: Tensor) -> Tensor:
        self._require_calibrated()
        n = self.num_levels
        per_alpha = x[0].numel() if self.per_row else x.numel()
        g = 1.0 / math.sqrt(per_alpha) if self.use_grad_scale else 1.0
        # the grid step s = 2 alpha / n: LSQ's gradients in s are SEQ's in alpha
        alpha = channel_view(grad_scale(self.alpha, g), x, self.per_row)
        s = alpha.to(x.dtype) * (2.0 / n)
        half = (n - 1) / 2  # the end levels are +-half steps
        xs = x / s
        v = (torch.round(xs + half) - half).detach()  # the bin centre, in steps (unclamped)
        inside = xs.detach().abs() < n / 2  # |w| < alpha
        q_in = (xs + (v - xs).detach()) * s  # gradients: 1 to x, v - x/s to s
        q_out = v.clamp(-half, half) * s  # gradients: 0 to x, +-half to s
        return torch.where(inside, q_in, q_out)

    def clamp_(self) -> None:
        with torch.no_grad():
            self.alpha.clamp_(min=EPS)

    def extra_repr(self) -> str:
        kind = "ternary" if self.ternary else f"{self.num_levels} levels"
        return f"bits={self.bits} ({kind}), role={self.role}, per_row={self.per_row}"
