"""PACT activation quantizer (Choi et al. 2018): a clipping level alpha learned per layer.

``y = clip(x, 0, alpha)`` then uniform k-bit on [0, alpha]:
``y_q = round(y (2^k - 1) / alpha) alpha / (2^k - 1)``. The rounding is straight-through, so
``dy_q/dx = 1`` on [0, alpha) and 0 elsewhere, and ``dy_q/dalpha = 1`` where ``x >= alpha``, 0
elsewhere (the paper's gradient): every x passes its gradient to exactly one of the two.
x = 0 counts as inside (qexp's choice; the paper's STE passes the gradient on the clip's
range): after a ReLU the ReLU's own backward gives 0 there anyway, so training is the same,
and where PACT's clip is itself the activation, units at exactly 0 are not cut off from
learning.
Signed inputs (e.g. hardtanh networks) use clip(x, -alpha, alpha) on a symmetric grid instead,
with ``dy_q/dx = 1`` on (-alpha, alpha) and ``dy_q/dalpha = -1`` where ``x <= -alpha``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from qexp.quant.base import Grid, Quantizer


class PACTQuantizer(Quantizer):
    """Learned-clip activation quantizer.

    Args:
        bits: bit width.
        role: must be ``"activation"`` (PACT's weights use DoReFa, see conf/quantizer/pact.yaml).
        alpha_init: initial clip level; ``None`` takes the maximum of the first training batch.
        signed: ``False`` clips to [0, alpha] (PACT); ``True`` to [-alpha, alpha]; ``None``
            decides from the first batch (signed if it has negative values).
    """

    rounds_then_clamps = True  # clamp(round(x / step), lo, hi) * step (see Quantizer)

    def __init__(
        self,
        bits: int,
        role: str = "activation",
        alpha_init: float | None = None,
        signed: bool | None = False,
    ) -> None:
        if role != "activation":
            raise ValueError(
                "PACT learns an activation clip; use e.g. DoReFaQuantizer for the weights"
            )
        if alpha_init is not None and alpha_init <= 0:
            raise ValueError(f"alpha_init must be positive, got {alpha_init}")
        super().__init__(bits, role)
        self.alpha = nn.Parameter(torch.tensor(float(alpha_init or 1.0)))
        # Buffers so that a checkpoint restores the calibration state exactly.
        self._register_calibration("initialized", done=alpha_init is not None)
        self._register_sign(signed)

    @property
    def signed(self) -> bool:  # type: ignore[override]
        """Whether the grid is signed (for activations: decided by the first batch)."""
        return self._is_signed()

    @torch.no_grad()
    def observe(self, x: Tensor) -> None:
        """Decide the sign and (if not given) alpha from the first batch seen."""
        self._decide_sign(x)
        if not self.is_calibrated():
            top = x.abs().max() if self._is_signed() else x.max()
            self.alpha.fill_(max(float(top), 1e-3))
            self._set_calibrated()

    def _levels(self) -> int:
        return 2**self.bits - 1 if not self._is_signed() else 2 ** (self.bits - 1) - 1

    def grid(self, x: Tensor) -> Grid:
        self._require_calibrated()
        if self._is_signed():
            if self.bits < 2:
                raise ValueError("signed PACT needs at least 2 bits")
            n = self._levels()
            return Grid(offset=-float(n), step=self.alpha / n, num_levels=2 * n + 1)
        n = self._levels()
        return Grid(offset=0.0, step=self.alpha / n, num_levels=n + 1)

    def forward(self, x: Tensor) -> Tensor:
        self._require_calibrated()
        a = self.alpha.to(x.dtype)
        lo = -a if self._is_signed() else torch.zeros_like(a)
        # where() rather than clamp(): the gradient of alpha is exactly 1 where x >= alpha
        # (and -1 where x <= -alpha when signed), as the paper defines it; x = 0 of an
        # unsigned clip is inside (gradient 1 to x, see the module doc).
        below = x <= lo if self._is_signed() else x < lo
        y = torch.where(x >= a, a, torch.where(below, lo, x))
        step = (a / self._levels()).detach()
        return y + (torch.round(y.detach() / step) * step - y.detach()).detach()

    def clamp_(self) -> None:
        with torch.no_grad():
            self.alpha.clamp_(min=1e-3)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, role={self.role}, alpha={float(self.alpha):.4g}"
