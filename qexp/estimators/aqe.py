"""Asymptotic-quantized estimator (AQE; Chen et al., JSTSP 2020): a smooth stand-in, no STE.

During training every body layer's weight and input go through a differentiable stand-in of its
quantizer, built on the quantizer's own grid (``Quantizer.grid``): for levels
``l_k = (offset + k) * D``, ``k = 0 .. n-1``, and midpoints ``m_i = (l_i + l_{i+1}) / 2``,

    s(x) = l_0 + D * sum_i (1 + tanh(beta (x - m_i) / D)) / 2

(the tanh staircase; qexp's choice, since the paper's exact function was not readable). Far from
the midpoints each term is 0 or 1, so as ``beta`` grows ``s`` tends to the hard quantizer, and
outside the grid it saturates at the end levels like the hard clamp. For a 2-level grid
``{-a, a}`` (``D = 2a``) it is ``a * tanh(beta x / (2a))``. Gradients are the exact derivatives
of ``s``; the slope at every midpoint is ``beta / 2``.

``beta`` follows ``schedule.beta`` (conf/curves.yaml), an exponential curve of training
progress. Evaluation uses the hard quantizer (the layers do that outside training), and the
trainer also reports the stand-in network's accuracy (``test_acc_soft``) and the gap.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from qexp.curves import Exponential, reaches
from qexp.estimators.base import Estimator
from qexp.estimators.compat import grid_input, refuse_without_grid
from qexp.quant.base import Grid, Quantizer
from qexp.quant.layers import QuantLayer

BetaCurve = Callable[[float], float]


#: grids with more levels than this sum only the midpoints near each value (_soft_index_window)
WINDOW_ABOVE_LEVELS = 64


def _soft_index(u: Tensor, offset: float, num_levels: int, beta: float) -> tuple[Tensor, Tensor]:
    """Stand-in in step units and its derivative: ``f(u)``, ``f'(u)`` for ``u = x / D``.

    ``f(u) = offset + sum_i (1 + tanh(beta (u - c_i))) / 2`` with ``c_i = offset + i + 1/2``.
    A loop over midpoints keeps memory at a few tensors of ``u``'s size whatever the bit width.
    """
    reach = _reach(beta)
    # many levels (8-bit inputs): only the nearby ones; up to 6 bits the exact sum (its values
    # are what every recorded run computed)
    if num_levels > WINDOW_ABOVE_LEVELS and num_levels - 1 > 2 * reach + 2:
        return _soft_index_window(u, offset, num_levels, beta, reach)
    f = torch.full_like(u, offset)
    fp = torch.zeros_like(u)
    for i in range(num_levels - 1):
        t = torch.tanh(beta * (u - (offset + i + 0.5)))
        f += 0.5 * (1.0 + t)
        fp += 0.5 * beta * (1.0 - t * t)
    return f, fp


def _reach(beta: float) -> int:
    """Steps beyond which a midpoint's tanh term is 0 or 1 to float32 precision: a term
    ``reach`` steps away differs by at most ``exp(-2 beta reach) <= exp(-18)``."""
    return int(math.ceil(9.0 / max(float(beta), 1e-3)))


def _soft_index_window(
    u: Tensor, offset: float, num_levels: int, beta: float, reach: int
) -> tuple[Tensor, Tensor]:
    """:func:`_soft_index` summing only the ``2 reach + 2`` midpoints around each ``u``: every
    midpoint further below counts 1, every one further above 0 (what their tanh terms are to
    float32 precision), so an 8-bit grid costs about 20 terms per value instead of 254."""
    top = num_levels - 2  # index of the highest midpoint
    m = torch.floor(u - offset - 0.5).clamp(-1 - reach, top + reach + 1)
    start = (m - reach).clamp(0, top + 1)  # midpoints 0 .. start-1 lie >= reach+1 below u
    f = offset + start
    fp = torch.zeros_like(u)
    for j in range(2 * reach + 2):
        i = start + j
        valid = i <= top
        t = torch.tanh(beta * (u - (offset + i + 0.5)))
        f = f + torch.where(valid, 0.5 * (1.0 + t), 0.0)
        fp = fp + torch.where(valid, 0.5 * beta * (1.0 - t * t), 0.0)
    return f, fp


def _compute_dtype(x: Tensor) -> torch.dtype:
    """At least float32 (half-precision inputs under autocast), float64 stays float64."""
    return torch.promote_types(x.dtype, torch.float32)


class _StandIn(torch.autograd.Function):
    """``s(x) = D f(x / D)`` with hand-written backward (recomputed, so nothing per level is kept).

    Gradients: ``ds/dx = f'(u)`` and ``ds/dD = f(u) - u f'(u)``; the latter only matters for
    quantizers whose step is learned (fixed quantizers hand out a step without gradient). With
    ``hard`` the forward returns the hard levels instead of ``s`` while the backward stays the
    stand-in's (see ``AQE``); ``hard`` is then the quantizer's own hard output, passed in so the
    values match ``Quantizer.hard`` bit for bit (e.g. the binary quantizer's sign(0) = +1).
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        step: Tensor,
        offset: float,
        num_levels: int,
        beta: float,
        hard: Tensor | None,
    ) -> Tensor:
        ctx.save_for_backward(x, step)
        ctx.params = (offset, num_levels, beta)
        if hard is not None:
            return hard.detach().to(x.dtype).clone()
        dt = _compute_dtype(x)
        f, _ = _soft_index(x.to(dt) / step.to(dt), offset, num_levels, beta)
        return (f * step.to(dt)).to(x.dtype)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        x, step = ctx.saved_tensors
        offset, num_levels, beta = ctx.params
        dt = _compute_dtype(x)
        u = x.to(dt) / step.to(dt)
        f, fp = _soft_index(u, offset, num_levels, beta)
        g = grad.to(dt)
        gx = (g * fp).to(x.dtype) if ctx.needs_input_grad[0] else None
        gs = None
        if ctx.needs_input_grad[1]:
            gs = (g * (f - u * fp)).sum_to_size(step.shape).to(step.dtype)
        return gx, gs, None, None, None, None


def stand_in(x: Tensor, grid: Grid, beta: float, hard: Tensor | None = None) -> Tensor:
    """The tanh staircase of ``grid`` at sharpness ``beta`` applied to ``x`` (see module doc).

    With ``hard`` (the quantizer's hard output for ``x``) the forward value is ``hard`` and the
    backward the stand-in's derivative.
    """
    step = torch.as_tensor(grid.step, device=x.device)
    if step.dim() > x.dim():
        raise ValueError("the grid's step has more dimensions than the quantized tensor")
    if grid.num_levels < 2:
        raise ValueError(f"a grid needs at least 2 levels, got {grid.num_levels}")
    return _StandIn.apply(x, step, float(grid.offset), int(grid.num_levels), float(beta), hard)


class AQE(Estimator):
    """Trains weights and activations of body layers through the tanh staircase stand-in.

    Args:
        beta: sharpness schedule over training progress (a curve such as
            ``qexp.curves.Exponential``; default 1 -> 20 over 90% of training, chosen
            so the stand-in's gradients stay within about 10x of STE's, see
            conf/estimator/aqe.yaml).
        beta_max: cap on beta; ``None`` for no cap (and no switch to hard values).
        hard_after_beta_max: once the schedule reaches ``beta_max``, forward the hard
            quantizer's values in training. The backward stays the stand-in's exact derivative
            at ``beta_max``: at that sharpness the stand-in already equals the staircase to
            within ``D * exp(-beta_max * d)`` at distance ``d * D`` from the nearest midpoint, so
            this is the stand-in's own gradient with its last, exponentially small, difference
            to the hard values removed from the forward. The derivative is tiny except within
            about ``D / beta_max`` of a midpoint; no straight-through gradient is used.
        activations: ``"stand_in"`` (the paper: inputs go through the stand-in too) or
            ``"ste"`` (inputs use the quantizer's straight-through forward, so the stand-ins'
            sharp derivatives do not multiply from layer to layer).

    The grid (step, offset) comes from the layer's quantizer at every call, so calibrated
    activation ranges and per-channel weight scales are followed as they change; their steps
    are constants for fixed quantizers and receive the stand-in's gradient for learned ones.
    """

    has_soft_forward = True

    def __init__(
        self,
        beta: BetaCurve | None = None,
        beta_max: float | None = 20.0,
        hard_after_beta_max: bool = True,
        activations: str = "stand_in",
    ) -> None:
        super().__init__()
        if activations not in ("stand_in", "ste"):
            raise ValueError(f"activations must be stand_in | ste, got {activations!r}")
        self.activations = activations
        if beta is None:
            beta = Exponential(start=1.0, end=20.0, p0=0.0, p1=0.9)
        if not callable(beta):
            raise ValueError(f"beta must be a curve of training progress, got {beta!r}")
        if beta_max is not None and beta_max <= 0:
            raise ValueError(f"beta_max must be positive (or null), got {beta_max}")
        b0 = float(beta(0.0))
        if b0 <= 0:
            raise ValueError(f"beta must be positive, but the curve starts at {b0}")
        self.beta_curve = beta
        self.beta_max = None if beta_max is None else float(beta_max)
        self.hard_after_beta_max = bool(hard_after_beta_max)
        # Buffers so a checkpoint (best.pt) restores the sharpness it was trained at, which is
        # what the soft evaluation at the end must use; Python mirrors avoid device syncs.
        self.register_buffer("beta", torch.tensor(b0))
        self.register_buffer("hard_forward", torch.tensor(False))
        self._beta, self._hard = b0, False
        self.register_load_state_dict_post_hook(AQE._refresh_mirrors)

    @staticmethod
    def _refresh_mirrors(module: nn.Module, incompatible_keys: Any) -> None:
        module._beta = float(module.beta)
        module._hard = bool(module.hard_forward)

    # -- schedule ----------------------------------------------------------------------------
    def step(self, progress: float) -> dict[str, float]:
        beta = float(self.beta_curve(progress))
        hard = False
        if self.beta_max is not None:
            # tolerance: a curve ending at beta_max may land a rounding error below it
            reached = beta >= self.beta_max * (1 - 1e-9)
            beta = min(beta, self.beta_max)
            hard = self.hard_after_beta_max and reached
        self.beta.fill_(beta)
        self.hard_forward.fill_(hard)
        # the mirror holds the buffer's (float32) value, so a restored checkpoint computes
        # exactly what training computed
        self._beta, self._hard = float(torch.tensor(beta, dtype=self.beta.dtype)), hard
        return {"beta": self._beta}

    def final_form_progress(self, resolution: int = 1000) -> float:
        """Where the sharpness reaches the end of its schedule (``beta_max``, or the curve's
        last value): from there the stand-in is the quantizer (and, with
        ``hard_after_beta_max``, the forward is the hard one)."""
        end = self.beta_curve(1.0)
        if self.beta_max is not None:
            end = min(end, self.beta_max)
        return reaches(self.beta_curve, end, resolution)

    def state_summary(self) -> dict[str, float]:
        return {"beta": self._beta, "hard_forward": float(self._hard)}

    # -- training forward ----------------------------------------------------------------------
    def soft(self, quant: Quantizer, x: Tensor, training: bool = True) -> Tensor:
        """``x`` through ``quant``'s stand-in at the current beta.

        In training, once switched (``hard_after_beta_max``), the forward carries the hard
        values. Outside training (the trainer's soft evaluation) it is always the stand-in
        itself, so ``test_acc_soft`` and the soft/hard gap measure the stand-in network.
        """
        hard = quant.hard(x) if self._hard and training else None
        # the grid's levels apply to grid_input(x) (tanh-normalised for DoReFa weights)
        return stand_in(grid_input(quant, x), quant.grid(x), self._beta, hard)

    def weight(self, layer: QuantLayer, w: Tensor) -> Tensor:
        return self.soft(layer.w_quant, w, layer.training)

    def activation(self, layer: QuantLayer, x: Tensor) -> Tensor:
        if self.activations == "ste":
            return layer.a_quant(x)
        return self.soft(layer.a_quant, x, layer.training)

    def check_quantizer(self, role: str, quant: Quantizer) -> None:
        """The stand-in is built on the quantizer's uniform grid (weights; inputs too unless
        they go through STE)."""
        if role == "activation" and self.activations == "ste":
            return
        refuse_without_grid(
            "aqe", role, quant, "use estimator=ste, clipped_ste or alpha_blend with it"
        )

    def extra_repr(self) -> str:
        return (
            f"beta={self._beta:.4g}, beta_max={self.beta_max}, "
            f"hard_after_beta_max={self.hard_after_beta_max}, activations={self.activations}"
        )
