"""DoReFa-Net quantizers (Zhou et al. 2016).

Weights, k bits: ``w_q = 2 quant_k(tanh(w) / (2 max|tanh(w)|) + 1/2) - 1`` with
``quant_k(v) = round((2^k - 1) v) / (2^k - 1)``; only the rounding is straight-through, so the
gradient passes through the tanh normalisation (as in the paper). 1 bit:
``sign(w) * sg(mean|w|)`` with a straight-through sign. Activations: ``quant_k(clip(x, 0, 1))``,
gradient passed inside [0, 1].
"""

from __future__ import annotations

import torch
from torch import Tensor

from qexp.quant.base import Grid, Quantizer, round_ste


def quant_k(v: Tensor, bits: int) -> Tensor:
    """``round((2^k - 1) v) / (2^k - 1)`` with a straight-through round (v in [0, 1])."""
    n = 2**bits - 1
    return round_ste(v * n) / n


def dorefa_normalize(w: Tensor) -> Tensor:
    """``tanh(w) / (2 max|tanh(w)|) + 1/2``: the weights mapped into [0, 1]."""
    t = torch.tanh(w)
    return t / (2 * t.abs().max().clamp(min=1e-12)) + 0.5


class DoReFaQuantizer(Quantizer):
    """DoReFa weight / activation quantizer (no options; the grid is fixed by ``bits``).

    The weight grid lives in [-1, 1] whatever the scale of the latent weights: ``grid()``
    describes those output levels, and ``hard(w)`` first normalises ``w`` with tanh
    (``grid_input``).

    Args:
        bits: bit width (1 bit: weights sign * mean|w|, activations {0, 1}).
        role: ``"weight"`` or ``"activation"``.
    """

    def __init__(self, bits: int, role: str = "weight") -> None:
        super().__init__(bits, role)
        self.signed = role == "weight"

    def grid(self, x: Tensor) -> Grid:
        n = 2**self.bits - 1
        if self.role == "activation":
            return Grid(offset=0.0, step=torch.tensor(1.0 / n, device=x.device), num_levels=n + 1)
        if self.bits == 1:
            return Grid(offset=-0.5, step=2 * x.detach().abs().mean(), num_levels=2)
        return Grid(offset=-n / 2, step=torch.tensor(2.0 / n, device=x.device), num_levels=n + 1)

    def grid_input(self, x: Tensor) -> Tensor:
        """The tensor ``grid()``'s levels apply to, differentiably: ``tanh(w) / max|tanh(w)|``
        for k-bit weights (so ``hard(w) == grid(w).snap(grid_input(w))``), else ``x``.

        Estimators that build on the grid (AQE, QuantNet) quantize this tensor, not the raw
        weight, so their levels are the ones DoReFa deploys.
        """
        if self.role == "activation" or self.bits == 1:
            return x
        t = torch.tanh(x)
        return t / t.abs().max().clamp(min=1e-12)

    def forward(self, x: Tensor) -> Tensor:
        if self.role == "activation":
            return quant_k(torch.clamp(x, 0.0, 1.0), self.bits)
        if self.bits == 1:
            scale = x.detach().abs().mean()
            sign = torch.where(x >= 0, 1.0, -1.0).to(x.dtype)
            return x + (sign * scale - x).detach()
        return 2 * quant_k(dorefa_normalize(x), self.bits) - 1

    def hard(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            return self.forward(x)
