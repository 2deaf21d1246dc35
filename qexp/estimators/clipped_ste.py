"""Clipped straight-through estimator (BinaryNet, Hubara et al. 2016)."""

from __future__ import annotations

import torch
from torch import Tensor

from qexp.estimators.base import Estimator, straight_through
from qexp.quant.layers import QuantLayer


class ClippedSTE(Estimator):
    """Forward q(x); backward passes the gradient only where |x| <= ``clip`` (hardtanh's slope).

    Args:
        clip: the gradient window; ``None`` uses the quantizer's own grid range instead
            (the outermost levels plus half a step), which suits multi-bit grids.
        clip_weights: clamp latent weights of quantized layers to [-clip, clip] after every
            optimizer step, as BinaryNet does.
    """

    name = "clipped_ste"

    def __init__(self, clip: float | None = 1.0, clip_weights: bool = True) -> None:
        super().__init__()
        self.clip = clip
        self.clip_weights = clip_weights

    def _mask(self, layer_quant, x: Tensor) -> Tensor:
        if self.clip is not None:
            return (x.abs() <= self.clip).to(x.dtype)
        grid = layer_quant.grid(x)
        lo = grid.low - grid.step / 2
        hi = grid.low + (grid.num_levels - 0.5) * grid.step
        return ((x >= lo) & (x <= hi)).to(x.dtype)

    def weight(self, layer: QuantLayer, w: Tensor) -> Tensor:
        return straight_through(w, layer.w_quant.hard(w), self._mask(layer.w_quant, w.detach()))

    def activation(self, layer: QuantLayer, x: Tensor) -> Tensor:
        return straight_through(x, layer.a_quant.hard(x), self._mask(layer.a_quant, x.detach()))

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        if not self.clip_weights or self.clip is None:
            return
        model = self.__dict__["model"]
        for m in model.modules():
            if isinstance(m, QuantLayer) and m.w_quant is not None and m.layer_role == "body":
                m.weight.clamp_(-self.clip, self.clip)
