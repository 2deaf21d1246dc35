"""Clipped straight-through estimator (BinaryNet, Hubara et al. 2016)."""

from __future__ import annotations

import torch
from torch import Tensor

from qexp.estimators.base import Estimator, straight_through
from qexp.estimators.compat import grid_input, refuse_without_grid
from qexp.quant.base import Quantizer
from qexp.quant.layers import QuantLayer

MULTIBIT = ("grid", "clip")


def is_multibit(quant: Quantizer) -> bool:
    """Whether ``quant`` may have more than two levels (learned precision counts as such)."""
    return quant.learns_bits or quant.bits > 1


def clip_window(quant: Quantizer, x: Tensor) -> tuple[Tensor, Tensor]:
    """(low, high) of the values ``quant`` does not clip, in the units of ``grid_input(x)``:
    the outermost levels plus half a step (``Quantizer.clip_window``)."""
    return quant.clip_window(x)


class ClippedSTE(Estimator):
    """Forward q(x); backward passes the gradient only inside a window (hardtanh's slope).

    Args:
        clip: BinaryNet's window |x| <= ``clip`` for 1-bit grids; ``None`` uses the quantizer's
            own range everywhere.
        clip_weights: clamp latent weights of quantized layers to [-clip, clip] after every
            optimizer step, as BinaryNet does.
        multibit: the window of grids with more than two levels: ``"grid"`` (default) the
            quantizer's own range, the outermost levels plus half a step, so every value that
            still lands on a distinct level gets a gradient; ``"clip"`` |x| <= ``clip`` as at
            1 bit (qexp's earlier behaviour, which zeroes gradients of values beyond 1 that
            the grid still resolves).
    """


    def __init__(
        self, clip: float | None = 1.0, clip_weights: bool = True, multibit: str = "grid"
    ) -> None:
        super().__init__()
        if multibit not in MULTIBIT:
            raise ValueError(f"multibit must be one of {' | '.join(MULTIBIT)}, got {multibit!r}")
        self.clip = clip
        self.clip_weights = clip_weights
        self.multibit = multibit

    def _uses_grid(self, quant: Quantizer) -> bool:
        return self.clip is None or (self.multibit == "grid" and is_multibit(quant))

    def _mask(self, quant: Quantizer, x: Tensor) -> Tensor:
        if not self._uses_grid(quant):
            return (x.abs() <= self.clip).to(x.dtype)
        low, high = clip_window(quant, x)
        u = grid_input(quant, x)
        return ((u >= low) & (u <= high)).to(x.dtype)

    def weight(self, layer: QuantLayer, w: Tensor) -> Tensor:
        hard = layer.w_quant.hard(w)  # first: quantizers initialise on the data they see
        return straight_through(w, hard, self._mask(layer.w_quant, w.detach()))

    def activation(self, layer: QuantLayer, x: Tensor) -> Tensor:
        hard = layer.a_quant.hard(x)
        return straight_through(x, hard, self._mask(layer.a_quant, x.detach()))

    def check_quantizer(self, role: str, quant: Quantizer) -> None:
        """The window comes from the quantizer's grid unless it computes its own."""
        if self._uses_grid(quant) and quant.window_needs_grid:
            refuse_without_grid(
                "clipped_ste", role, quant, "use estimator.multibit=clip or estimator=ste"
            )

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        if not self.clip_weights or self.clip is None:
            return
        model = self.model
        for m in model.modules():
            if isinstance(m, QuantLayer) and m.w_quant is not None and m.layer_role == "body":
                m.weight.clamp_(-self.clip, self.clip)
