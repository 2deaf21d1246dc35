"""Uniform quantizer with a data-driven range (max-abs or MSE-optimal clipping).

Weights use a symmetric grid with a range computed from the current weights at every forward;
activations use an unsigned grid after ReLU (or signed where inputs go negative) with a range
tracked as an exponential moving average of per-batch estimates, so evaluation is deterministic.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from qexp.quant.base import Grid, Quantizer, channel_view

#: clipping ratios (of max |x|) tried by the MSE search: geometric, denser at small ratios
#: because low bit widths want aggressive clipping.
_MSE_RATIOS = torch.logspace(-1.3, 0.0, 16).tolist()


def grid_for_range(rng: Tensor, bits: int, signed: bool, signed_grid: str = "midrise") -> Grid:
    """The uniform grid of ``bits`` whose outermost levels sit at +-``rng`` (or 0..``rng``).

    Signed ``midrise`` grids use all ``2**bits`` levels symmetrically around zero (no zero
    level, the DoReFa weight grid; 1 bit gives +-rng). ``narrow`` grids contain zero and use
    ``2**bits - 1`` levels (1 bit is treated like midrise since {0} alone is no grid).
    """
    rng = torch.clamp(rng, min=1e-8)
    if not signed:
        n = 2**bits
        return Grid(offset=0.0, step=rng / (n - 1), num_levels=n)
    if signed_grid == "narrow" and bits > 1:
        half = 2 ** (bits - 1) - 1
        return Grid(offset=-float(half), step=rng / half, num_levels=2 * half + 1)
    half = 2 ** (bits - 1) - 0.5
    return Grid(offset=-half, step=rng / half, num_levels=2**bits)


@torch.no_grad()
def mse_optimal_range(
    x2d: Tensor, bits: int, signed: bool, signed_grid: str = "midrise"
) -> Tensor:
    """Per-row range minimising the squared quantization error of ``x2d`` (rows = channels).

    Each row is divided by its max-abs, so every candidate clipping ratio is one scalar grid
    for all rows and the search runs as a few in-place passes per candidate (this runs on the
    weights at every training step).
    """
    max_abs = x2d.abs().amax(dim=1) if signed else x2d.clamp(min=0).amax(dim=1)
    u = x2d / max_abs.clamp(min=1e-12)[:, None]
    unit = grid_for_range(torch.ones(()), bits, signed, signed_grid)
    unit_step, offset, top = float(unit.step), unit.offset, unit.num_levels - 1
    best_err = torch.full_like(max_abs, float("inf"))
    best_ratio = torch.ones_like(max_abs)
    buf = torch.empty_like(u)
    for ratio in _MSE_RATIOS:
        step = unit_step * ratio
        torch.div(u, step, out=buf)
        buf.sub_(offset).round_().clamp_(0, top).add_(offset).mul_(step).sub_(u)
        err = buf.square_().sum(dim=1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_ratio = torch.where(better, ratio, best_ratio)
    return best_ratio * max_abs


class UniformQuantizer(Quantizer):
    """Uniform grid with a max-abs or MSE-optimal range.

    Args:
        bits: bit width.
        role: ``"weight"`` or ``"activation"``.
        signed: ``True``/``False``, or ``None`` for the default (weights signed; activations
            signed only if the first batch seen has negative values).
        per_channel: one range per output channel (dim 0); weights only.
        scale_method: ``"max_abs"`` or ``"mse"`` (MSE-optimal clipping, searched over ratios).
        signed_grid: ``"midrise"`` (2**bits levels, no zero) or ``"narrow"`` (zero included).
        momentum: EMA momentum of the activation range.
        calib_samples: at most this many activation values feed the MSE search per batch.
    """

    def __init__(
        self,
        bits: int,
        role: str = "weight",
        signed: bool | None = None,
        per_channel: bool = True,
        scale_method: str = "mse",
        signed_grid: str = "midrise",
        momentum: float = 0.1,
        calib_samples: int = 4096,
    ) -> None:
        super().__init__(bits, role)
        if scale_method not in ("max_abs", "mse"):
            raise ValueError(f"scale_method must be 'max_abs' or 'mse', got {scale_method!r}")
        if signed_grid not in ("midrise", "narrow"):
            raise ValueError(f"signed_grid must be 'midrise' or 'narrow', got {signed_grid!r}")
        self.per_channel = per_channel and role == "weight"
        self.scale_method = scale_method
        self.signed_grid = signed_grid
        self.momentum = momentum
        self.calib_samples = calib_samples
        if role == "weight":
            self.signed = True if signed is None else bool(signed)
        else:
            # Activation state lives in buffers so checkpoints restore it exactly; the range
            # is an EMA over training batches, so observation goes on through training.
            self.register_buffer("range", torch.tensor(0.0))
            self._register_calibration("calibrated")
            self._register_sign(signed)
            self.tracks_during_training = True

    # -- range estimation -------------------------------------------------------------------
    def _estimate_range(self, x: Tensor) -> Tensor:
        """Range of ``x`` per channel (weights) or per tensor, by the configured method."""
        x = x.detach().float()
        rows = x.reshape(x.shape[0], -1) if self.per_channel else x.reshape(1, -1)
        if self.role == "activation" and rows.shape[1] > self.calib_samples:
            # A strided subsample keeps the MSE search cheap on large activation maps.
            stride = rows.shape[1] // self.calib_samples
            sample = rows[:, ::stride]
        else:
            sample = rows
        signed = self._is_signed()
        if self.scale_method == "max_abs":
            rng = rows.abs().amax(dim=1) if signed else rows.clamp(min=0).amax(dim=1)
        else:
            rng = mse_optimal_range(sample, self.bits, signed, self.signed_grid)
        return rng if self.per_channel else rng.reshape(())

    def _is_signed(self) -> bool:
        if self.role == "weight":
            return self.signed
        return super()._is_signed()

    @torch.no_grad()
    def observe(self, x: Tensor) -> None:
        """Fold a training batch into the activation range (EMA)."""
        if self.role != "activation":
            return
        self._decide_sign(x)
        rng = self._estimate_range(x)
        if not self.is_calibrated():
            self.range.copy_(rng)
            self._set_calibrated()
        else:
            self.range.lerp_(rng, self.momentum)

    def _weight_range(self, w: Tensor) -> Tensor:
        """Range of a weight tensor, cached while the parameter is unchanged.

        Evaluation and logging call this many times on the same weights; an in-place optimizer
        step bumps the parameter's version counter and so invalidates the cache. Non-leaf
        inputs (weights produced by another computation) are never cached.
        """
        if not isinstance(w, nn.Parameter):
            return self._estimate_range(w)
        key = (w.data_ptr(), w._version, tuple(w.shape), self.bits)
        cached = self.__dict__.get("_range_cache")
        if cached is not None and cached[0] == key:
            return cached[1]
        rng = self._estimate_range(w)
        self.__dict__["_range_cache"] = (key, rng)
        return rng

    def grid(self, x: Tensor) -> Grid:
        if self.role == "weight":
            rng = channel_view(self._weight_range(x), x, self.per_channel)
            return grid_for_range(rng, self.bits, self.signed, self.signed_grid)
        self._require_calibrated()
        return grid_for_range(self.range, self.bits, self._is_signed(), self.signed_grid)

    def extra_repr(self) -> str:
        return (
            f"bits={self.bits}, role={self.role}, per_channel={self.per_channel}, "
            f"scale_method={self.scale_method}, signed_grid={self.signed_grid}"
        )
