"""The quantizer interface: a forward map of a tensor onto a grid of levels.

A quantizer only says *where* values land. How gradients pass through it during training is
the estimator's business (qexp.estimators); the quantizer offers the pieces estimators need:

- ``hard(x)``: the values on the grid (what the deployed network computes);
- ``forward(x)``: the straight-through training forward, ``x + sg(hard(x) - x)`` for fixed grids,
  or the quantizer's own gradient definition where its parameters are learned (LSQ, PACT, ...);
- ``grid(x)``: the uniform grid as (lowest level, step, number of levels), so smooth stand-ins
  of the staircase (AQE, QuantNet) can be built on the same levels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from qexp.bitwidth import TERNARY_BITS, is_ternary, max_levels, storage_bits


@dataclass
class Grid:
    """Uniformly spaced levels ``(offset + k) * step`` for ``k = 0 .. num_levels - 1``.

    ``offset`` is the lowest level in units of ``step`` (e.g. -1.5 for a symmetric 2-bit grid,
    0 for an unsigned one); keeping it in step units makes symmetric grids exactly symmetric in
    floating point. ``step`` broadcasts against the quantized tensor (per tensor or channel).
    """

    offset: float
    step: Tensor
    num_levels: int

    @property
    def low(self) -> Tensor:
        """The lowest level."""
        return self.offset * self.step

    def index(self, x: Tensor) -> Tensor:
        """Integer level index of each value (nearest level, clamped to the grid)."""
        return torch.clamp(torch.round(x / self.step - self.offset), 0, self.num_levels - 1)

    def snap(self, x: Tensor) -> Tensor:
        """Round ``x`` to the nearest level (values outside the grid go to the end levels)."""
        if torch.is_grad_enabled() and x.requires_grad:
            return (self.index(x) + self.offset) * self.step
        # No autograd: work in place on one buffer (about 3x faster than fresh tensors, and
        # faster than torch's fake-quant kernels on CPU).
        y = torch.div(x, self.step)
        if self.offset:  # unsigned grids (offset 0) skip two passes over the tensor
            y.sub_(self.offset).round_().clamp_(0, self.num_levels - 1).add_(self.offset)
        else:
            y.round_().clamp_(0, self.num_levels - 1)
        return y.mul_(self.step)


class _StraightThrough(torch.autograd.Function):
    """Returns ``hard`` in the forward pass; passes the gradient to ``x`` unchanged."""

    @staticmethod
    def forward(ctx, x: Tensor, hard: Tensor) -> Tensor:  # noqa: D102
        return hard

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # noqa: D102
        return grad, None


def ste(x: Tensor, hard: Tensor) -> Tensor:
    """``x + sg(hard - x)`` without the two extra passes over memory."""
    return _StraightThrough.apply(x, hard.detach())


def round_ste(x: Tensor) -> Tensor:
    """Round in the forward pass, identity in the backward pass."""
    return ste(x, torch.round(x))


def channel_view(t: Tensor, like: Tensor, per_channel: bool) -> Tensor:
    """Shape a per-channel vector (dim 0 of ``like``) so it broadcasts against ``like``."""
    if not per_channel:
        return t.reshape(())
    return t.reshape((-1,) + (1,) * (like.dim() - 1))


#: the quantizers that build a ternary grid at bits=1.58, for messages
TERNARY_QUANTIZERS = (
    "quantizer=ternary, quantizer=seq, or quantizer=uniform with "
    "quantizer.weight.signed_grid=narrow"
)


def ternary_refusal(name: str, role: str) -> str:
    """The one-line refusal of bits=1.58 by a quantizer without a ternary grid."""
    if role == "activation":
        return (
            f"a_bits=1.58 (ternary) is a weight format that {name} does not quantize "
            "activations to: give the activations an integer a_bits (e.g. a_bits=8)"
        )
    return f"w_bits=1.58 (ternary, 3 levels) has no {name} grid: use {TERNARY_QUANTIZERS}"


class Quantizer(nn.Module):
    """Base class of all quantizers.

    Args:
        bits: bit width; the grid has at most ``2 ** bits`` levels. ``1.58`` (ternary: three
            levels ``{-s, 0, +s}``, stored in 2 bits, qexp.bitwidth) only where the subclass
            says it builds that grid (:meth:`accepts_ternary`); others refuse it.
        role: ``"weight"`` or ``"activation"``; quantizers may use different defaults for each.
    """

    #: whether the grid is signed (set by subclasses; activations may decide on first use)
    signed: bool = True
    #: whether observation goes on through training after the calibration phase (running
    #: statistics such as an EMA range); quantizers that only initialise from data say False
    tracks_during_training: bool = False
    #: whether the bit width is learned in training (learned mixed precision)
    learns_bits: bool = False
    #: whether ``grid()`` describes the levels (False for power-of-two levels)
    uniform_grid: bool = True
    #: whether ``clip_window`` is read off ``grid()`` (False where the quantizer computes it)
    window_needs_grid: bool = True
    #: whether the hard map is ``clamp(round(x / step), lo, hi) * step`` with an integer
    #: offset, rather than the Grid form ``(clamp(round(x / step - offset), 0, n - 1) + offset)
    #: * step`` (the two round half-way values differently; the exporter writes the right one)
    rounds_then_clamps: bool = False

    def __init__(self, bits: int, role: str = "weight") -> None:
        super().__init__()
        if role not in ("weight", "activation"):
            raise ValueError(f"role must be 'weight' or 'activation', got {role!r}")
        self._check_ternary(bits, role)
        self.role = role
        self._bits = storage_bits(bits)
        #: three levels {-s, 0, +s} (bits=1.58), stored in ``bits`` = 2
        self.ternary = is_ternary(bits)
        #: set by qexp.quant.calibrate: layers call ``observe`` only while this is on
        self.observing = False
        self._calib_flag: str | None = None
        self._calibrated = True

    # -- calibration state ------------------------------------------------------------------------
    def _register_calibration(self, buffer: str, done: bool = False) -> None:
        """Keep "has seen its calibration data" in the boolean buffer ``buffer`` (so checkpoints
        restore it) with a Python mirror, so forwards check it without a device sync."""
        self.register_buffer(buffer, torch.tensor(bool(done)))
        self._calib_flag = buffer
        self._calibrated = bool(done)
        self.register_load_state_dict_post_hook(Quantizer._refresh_calibrated)

    @staticmethod
    def _refresh_calibrated(module: nn.Module, incompatible_keys: object) -> None:
        if module._calib_flag is not None:
            module._calibrated = bool(getattr(module, module._calib_flag))

    def _set_calibrated(self) -> None:
        """Record that calibration data has been seen (buffer and mirror)."""
        if self._calib_flag is not None:
            getattr(self, self._calib_flag).fill_(True)
        self._calibrated = True

    def is_calibrated(self) -> bool:
        """Whether the quantizer has the data-derived state its grid needs."""
        return self._calibrated

    def _require_calibrated(self) -> None:
        if not self._calibrated:
            raise RuntimeError(
                f"{type(self).__name__} ({self.role}, {self.bits} bits) has seen no data: run a "
                "calibration pass first (qexp.quant.calibrate)"
            )

    @property
    def bits(self) -> int:
        """Current bit width (learned-precision quantizers override this)."""
        return self._bits

    @property
    def max_levels(self) -> int:
        """The most distinct values this quantizer's grid may produce (3 when ternary)."""
        return max_levels(TERNARY_BITS if self.ternary else self.bits)

    def _check_ternary(self, bits: float, role: str) -> None:
        """Refuse ``bits=1.58`` unless :meth:`accepts_ternary` (subclasses whose own bit
        checks run before ``super().__init__`` call this first, so the refusal names 1.58)."""
        if is_ternary(bits) and not self.accepts_ternary(role):
            raise ValueError(ternary_refusal(type(self).__name__, role))

    def accepts_ternary(self, role: str) -> bool:
        """Whether ``bits=1.58`` gives this quantizer the ternary grid ``{-s, 0, +s}`` for
        ``role`` (called before ``__init__`` sets any state; the options a subclass takes
        may be read from its own arguments there); default: no."""
        return False

    @property
    def min_bits(self) -> int:
        """The fewest bits this quantizer can reach (what a memory budget can ask of it):
        its bit width, unless it learns one."""
        return self.bits

    # -- sign decided by data (activations) -----------------------------------------------------
    def _register_sign(self, signed: bool | None) -> None:
        """Keep the grid's sign in a buffer, so checkpoints restore it, with a Python mirror,
        so hot paths read it without a device sync: -1 = decided by the first batch seen,
        0 = unsigned, 1 = signed."""
        state = -1 if signed is None else int(bool(signed))
        self.register_buffer("signed_state", torch.tensor(state))
        self._sign = state
        self.register_load_state_dict_post_hook(Quantizer._refresh_sign)

    @staticmethod
    def _refresh_sign(module: nn.Module, incompatible_keys: object) -> None:
        module._sign = int(module.signed_state.item())

    @torch.no_grad()
    def _decide_sign(self, x: Tensor) -> None:
        """If the sign is undecided: signed iff ``x`` (the first batch) has negative values."""
        if self._sign == -1:
            self._sign = int(bool((x < 0).any()))
            self.signed_state.fill_(self._sign)

    def _is_signed(self) -> bool:
        return self._sign == 1

    def grid(self, x: Tensor) -> Grid:
        """The grid ``x`` is quantized onto (may depend on ``x`` for data-driven scales)."""
        raise NotImplementedError

    def grid_input(self, x: Tensor) -> Tensor:
        """The tensor whose values ``grid(x)`` describes (differentiable): ``x`` itself unless
        the quantizer maps it first (DoReFa's k-bit weights: ``tanh(w) / max|tanh(w)|``)."""
        return x

    def clip_window(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(low, high) of the values this quantizer does not clip, in the units of
        ``grid_input(x)``: by default the outermost grid levels plus half a step."""
        grid = self.grid(x)
        low = grid.low - grid.step / 2
        return low, low + grid.num_levels * grid.step

    def observe(self, x: Tensor) -> None:
        """Update calibration state from values this quantizer sees (called by the layers only
        while ``observing``: the calibration phase, and training for quantizers that
        ``tracks_during_training``); default: nothing to calibrate."""

    def bind_weight(self, weight: Tensor) -> None:
        """See the layer's weight when the layer is built (quantizers whose learned
        parameters are shaped like the weight's rows create them here, before the optimizer
        collects the parameters: qexp.quant.seq); default: nothing."""

    def refresh(self, w: Tensor, step: int) -> None:
        """Update state derived from the weight ``w`` after optimizer step ``step`` (weight
        quantizers; called outside the forward, so costly work such as a range search never
        sits in a compiled training graph); default: nothing."""

    def hard(self, x: Tensor) -> Tensor:
        """Values of ``x`` on the grid. Gradients through this are not meaningful."""
        with torch.no_grad():
            return self.grid(x).snap(x)

    def forward(self, x: Tensor) -> Tensor:
        """Straight-through training forward: hard values, identity gradient to ``x``."""
        return ste(x, self.hard(x))

    def clamp_(self) -> None:
        """Keep learned parameters in their valid range (called after every optimizer step)."""

    def extra_repr(self) -> str:
        return f"bits={self.bits}, role={self.role}"
