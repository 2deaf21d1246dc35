"""LSQ: learned step size quantization (Esser et al. 2020).

``v_hat = round(clip(v / s, -Q_N, Q_P)) * s`` with a learned step ``s`` per tensor. Signed
values (weights) use ``Q_N = 2^(b-1)``, ``Q_P = 2^(b-1) - 1``; unsigned ones (activations after
ReLU) ``Q_N = 0``, ``Q_P = 2^b - 1``. Gradients: ``dv_hat/dv = 1`` inside the range, 0 outside;
``dv_hat/ds = round(v/s) - v/s`` inside, ``-Q_N`` below, ``Q_P`` above, scaled by
``g = 1 / sqrt(N Q_P)``.

Where "inside" is decided: by default on ``v / s`` itself, ``-Q_N < v/s < Q_P`` (the paper:
clip, then round, as lsq-net does; the ends themselves count as clipped). With
``clip_first=False`` it is decided on ``round(v / s)`` (round, then clamp), as PyTorch's op
``torch._fake_quantize_learnable_per_tensor_affine`` does: the values are the same, but within
half a step beyond an end the step's gradient is then ``Q_P - v/s`` (or ``-Q_N - v/s``)
instead of ``Q_P`` (``-Q_N``), and the input still gets a gradient there.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from qexp.quant.base import Grid, Quantizer


def grad_scale(t: Tensor, g: float) -> Tensor:
    """``t`` in the forward pass; its gradient multiplied by ``g`` in the backward pass."""
    scaled = t * g
    return (t - scaled).detach() + scaled


class LSQQuantizer(Quantizer):
    """Learned-step uniform quantizer.

    ``s`` starts at ``2 mean|v| / sqrt(Q_P)`` of the first tensor it sees: the weights at the
    first forward (so after ``init_from`` has loaded them), or the first activation batch.

    Args:
        bits: bit width (signed values need at least 2).
        role: ``"weight"`` or ``"activation"``.
        signed: ``None``: weights signed, activations signed only if the first batch has
            negative values; or force ``True`` / ``False``.
        grad_scale: scale the step's gradient by ``1 / sqrt(N Q_P)`` (N: weights of the layer,
            or activation values per sample); ``False`` leaves it unscaled.
        clip_first: decide "inside the range" on ``v / s`` (True, the paper) or on
            ``round(v / s)`` (False, torch's fake-quant op); see the module docstring.
    """

    rounds_then_clamps = True  # clamp(round(x / step), lo, hi) * step (see Quantizer)

    def __init__(
        self,
        bits: int,
        role: str = "weight",
        signed: bool | None = None,
        grad_scale: bool = True,
        clip_first: bool = True,
    ) -> None:
        super().__init__(bits, role)
        self.clip_first = bool(clip_first)
        if role == "weight" and signed is None:
            signed = True
        self.use_grad_scale = grad_scale
        self.step = nn.Parameter(torch.tensor(1.0))
        self._register_calibration("initialized")
        self._register_sign(signed)
        if signed and bits < 2:
            raise ValueError("LSQ needs at least 2 bits for signed values (Q_P would be 0)")

    # -- range -----------------------------------------------------------------------------------
    @property
    def signed(self) -> bool:  # type: ignore[override]
        """Whether the grid is signed (for activations: decided by the first batch)."""
        return self._is_signed()

    def q_range(self) -> tuple[int, int]:
        """(Q_N, Q_P): the grid is ``-Q_N .. Q_P`` steps."""
        b = self.bits
        if self._is_signed():
            return 2 ** (b - 1), 2 ** (b - 1) - 1
        return 0, 2**b - 1

    @torch.no_grad()
    def _maybe_init(self, x: Tensor) -> None:
        if self._sign == -1:
            self._decide_sign(x)
            if self._is_signed() and self.bits < 2:
                raise ValueError("LSQ needs at least 2 bits for signed activations")
        if not self.is_calibrated():
            _, q_p = self.q_range()
            s = 2 * x.detach().abs().mean() / math.sqrt(q_p)
            self.step.fill_(max(float(s), 1e-8))
            self._set_calibrated()

    def observe(self, x: Tensor) -> None:
        self._maybe_init(x)  # the calibration phase: init from the first values seen

    # -- maps ------------------------------------------------------------------------------------
    def grid(self, x: Tensor) -> Grid:
        self._require_calibrated()
        q_n, q_p = self.q_range()
        return Grid(offset=-float(q_n), step=self.step, num_levels=q_n + q_p + 1)

    def forward(self, x: Tensor) -> Tensor:
        self._require_calibrated()
        q_n, q_p = self.q_range()
        n = x.numel() if self.role == "weight" else x[0].numel()
        g = 1.0 / math.sqrt(n * q_p) if self.use_grad_scale else 1.0
        s = grad_scale(self.step, g).to(x.dtype)
        xs = x / s
        v = torch.round(xs).detach()
        # Inside/outside by an explicit mask, on x / s (paper) or on its rounding (torch's op):
        # clamping ``round_ste(x / s)`` would misjudge ties through float error.
        if self.clip_first:  # the paper: inside is -Q_N < v/s < Q_P, the ends count as clipped
            inside = (xs.detach() > -q_n) & (xs.detach() < q_p)
        else:  # torch's op: -Q_N <= round(v/s) <= Q_P
            inside = (v >= -q_n) & (v <= q_p)
        q_in = (xs + (v - xs).detach()) * s  # gradients: 1 to x, round(x/s) - x/s to s
        q_out = v.clamp(-q_n, q_p) * s  # gradients: 0 to x, -Q_N or Q_P to s
        return torch.where(inside, q_in, q_out)

    def clamp_(self) -> None:
        with torch.no_grad():
            self.step.clamp_(min=1e-8)

    def extra_repr(self) -> str:
        return (
            f"bits={self.bits}, role={self.role}, step={float(self.step.detach()):.4g}, "
            f"clip_first={self.clip_first}"
        )
