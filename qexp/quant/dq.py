"""Differentiable quantization with learned precision (Uhlich et al., ICLR 2020).

Uniform quantizer ``Q(x) = d round(clip(x, x_min, q_max) / d)`` with ``x_min = -q_max``
(signed) or 0 (unsigned, after ReLU). Three parametrizations of the same map:

- U1 learns (b, d), ``q_max = d (2^(b-1) - 1)``;
- U2 learns (b, q_max), ``d = q_max / (2^(b-1) - 1)``;
- U3 learns (d, q_max) and infers ``b = ceil(log2(n + 1) + 1)`` with ``n = round(q_max / d)``
  (unsigned: ``2^b - 1`` and ``ceil(log2(n + 1))``), bounded to [b_min, b_max]. ``n`` is the
  rounded ratio because the forward's end level is ``d n``: the bits are those of the grid the
  forward really uses, as in the authors' network-size code.

Rounding is straight-through. U3's gradients are the paper's closed forms:
``dQ/dd = (Q(x) - x) / d`` inside [x_min, q_max] and 0 outside; ``dQ/dq_max = 0`` inside and
``sign(x)`` outside. U1/U2 get theirs by the chain rule through the derived value.

Power-of-two variant (:class:`DQPow2Quantizer`): magnitudes ``2^k`` between q_min and q_max,
learned as P1 (b, q_max), P2 (b, q_min) or P3 (q_min, q_max, b inferred as
``ceil(log2(log2(q_max / q_min) + 1) + 1)``), one subclass each (:func:`dq_pow2` by name).

The run's bit width (``bits`` / ``w_bits`` / ``a_bits``) is the *initial* bit width of these
quantizers and, unless ``b_max`` says otherwise, also the largest one. The current bit width
(``bits``) can change at every optimizer step; ``bits_tensor()`` is the same value with the
gradient of the continuous (pre-ceil) bit width, for memory penalties (qexp.quant.budget).

Initialisation: weights from ``max|w|`` at the initial bit width, at their first forward (so
that ``init_from`` has already loaded them); activations from the first training batch.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn

from qexp.errors import QexpError
from qexp.quant.base import Grid, Quantizer, round_ste

#: slack when turning a continuous bit width into an integer, so that float error at an exact
#: power of two (log2(8) = 3.0000001) does not add a bit
_BITS_EPS = 1e-5


def ceil_ste(x: Tensor) -> Tensor:
    """Ceil in the forward pass, identity in the backward pass."""
    return x + (torch.ceil(x) - x).detach()


def clamp_ste(x: Tensor, lo: float, hi: float) -> Tensor:
    """Clamp in the forward pass, identity in the backward pass."""
    return x + (torch.clamp(x, lo, hi) - x).detach()


def pow2_ste(x: Tensor) -> Tensor:
    """``2^round(log2 x)`` with a straight-through round of the exponent."""
    return torch.exp2(round_ste(torch.log2(x)))


def uniform_dq(x: Tensor, d: Tensor, q_max: Tensor, signed: bool) -> Tensor:
    """``d round(clip(x, x_min, q_max) / d)`` with U3's gradients (see the module docstring).

    Inside the range the value is ``d round_ste(x / d)`` (so ``dQ/dd = round(x/d) - x/d``,
    ``dQ/dx = 1``). Outside it is the end level ``+-d round(q_max / d)``, written as
    ``q_max + sg(level - q_max)`` so that its gradient is 1 for q_max and 0 for d, which is what
    the paper's closed form says, while the value stays on the grid.
    """
    top = q_max + (d * torch.round(q_max / d) - q_max).detach()
    inner = d * round_ste(x / d)
    if signed:
        bottom, x_min = -top, -q_max
    else:
        bottom, x_min = torch.zeros_like(top), torch.zeros_like(q_max)
    return torch.where(x > q_max, top, torch.where(x < x_min, bottom, inner))


def uniform_bits(ratio: Tensor, signed: bool) -> Tensor:
    """Continuous bit width of a uniform grid with ``q_max / d = ratio``."""
    b = torch.log2(ratio + 1)
    return b + 1 if signed else b


def uniform_ratio(bits: int | Tensor, signed: bool) -> int | Tensor:
    """``q_max / d`` of a full grid of ``bits``: ``2^(b-1) - 1`` (signed) or ``2^b - 1``."""
    return 2 ** (bits - 1) - 1 if signed else 2**bits - 1


class _LearnedPrecision(Quantizer):
    """Shared state of the learned-precision quantizers: sign, bounds, lazy initialisation.

    Subclasses define ``_bits_cont()`` (continuous bit width, a tensor), ``_init_params(top)``
    (set the learned parameters for the range ``top`` at the initial bit width) and
    ``clamp_()``.
    """

    #: marks quantizers whose bit width is learned (read by the budget penalty and logging)
    learns_bits = True

    def __init__(
        self, bits: int, role: str, signed: bool | None, b_min: int, b_max: int | None
    ) -> None:
        super().__init__(bits, role)
        if role == "weight" and signed is None:
            signed = True
        b_max = int(bits) if b_max is None else int(b_max)
        if not 1 <= b_min <= b_max <= 16:
            raise ValueError(f"need 1 <= b_min <= b_max <= 16, got b_min={b_min}, b_max={b_max}")
        if not b_min <= bits <= b_max:
            raise ValueError(
                f"the initial bit width (the run's bits) {bits} must lie in "
                f"[b_min, b_max] = [{b_min}, {b_max}]"
            )
        self.b_min, self.b_max = int(b_min), b_max
        self._register_calibration("initialized")
        self._register_sign(signed)

    # -- sign and bounds -------------------------------------------------------------------------
    @property
    def signed(self) -> bool:  # type: ignore[override]
        return self._is_signed()

    def _b_lo(self) -> int:
        """Smallest usable bit width: a signed uniform grid needs -d, 0, d (2 bits)."""
        return self.b_min

    @property
    def min_bits(self) -> int:
        """The fewest bits this quantizer can learn (what a memory budget can reach)."""
        return self._b_lo()

    # -- bit width -------------------------------------------------------------------------------
    def _bits_cont(self) -> Tensor:
        raise NotImplementedError

    def bits_tensor(self) -> Tensor:
        """Current integer bit width, with the gradient of the continuous bit width."""
        if not self.is_calibrated():
            return torch.tensor(float(self._bits), device=self.initialized.device)
        b = self._bits_cont()
        return clamp_ste(ceil_ste(b - _BITS_EPS), float(self._b_lo()), float(self.b_max))

    @property
    def bits(self) -> int:
        """Current bit width (the initial one until the quantizer has seen data)."""
        with torch.no_grad():
            return int(round(float(self.bits_tensor())))

    # -- initialisation --------------------------------------------------------------------------
    @torch.no_grad()
    def _maybe_init(self, x: Tensor) -> None:
        self._decide_sign(x)
        if self.is_calibrated():
            return
        top = x.detach().abs().max() if self._is_signed() else x.detach().clamp(min=0).max()
        self._init_params(max(float(top), 1e-6))
        self._set_calibrated()
        self.clamp_()

    def _init_params(self, top: float) -> None:
        raise NotImplementedError

    def observe(self, x: Tensor) -> None:
        self._maybe_init(x)  # the calibration phase: init from the first values seen


class _UniformDQ(_LearnedPrecision):
    """Uniform learned-precision quantizer; subclasses choose what is learned (``_dq``)."""

    pow2_step: bool = False
    window_needs_grid = False  # clip_window reads (d, q_max) directly
    rounds_then_clamps = True

    def _b_lo(self) -> int:
        return max(self.b_min, 2) if self._is_signed() else self.b_min

    def _dq(self) -> tuple[Tensor, Tensor]:
        """(d, q_max) as differentiable tensors."""
        raise NotImplementedError

    def _bits_cont(self) -> Tensor:
        d, q_max = self._dq()
        # The forward's end level is d round(q_max / d), so the grid has round(q_max / d)
        # steps per side: count the bits of that grid (the authors' network-size code rounds
        # q_max onto the grid first). Straight-through, so a budget still moves d and q_max.
        return uniform_bits(round_ste(q_max / d), self._is_signed())

    def grid(self, x: Tensor) -> Grid:
        self._require_calibrated()
        d, q_max = self._dq()
        n = int(torch.round(q_max / d).item())
        if self._is_signed():
            return Grid(offset=-float(n), step=d, num_levels=2 * n + 1)
        return Grid(offset=0.0, step=d, num_levels=n + 1)

    def forward(self, x: Tensor) -> Tensor:
        self._require_calibrated()
        d, q_max = self._dq()
        return uniform_dq(x, d.to(x.dtype), q_max.to(x.dtype), self._is_signed())

    def hard(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            return self.forward(x)

    @torch.no_grad()
    def clip_window(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Values outside this interval are clipped: the end levels plus half a step
        (tensors, no device sync; used by clipped_ste's gradient window). Call after the
        quantizer has seen data (``hard`` or ``forward``)."""
        d, q_max = self._dq()
        top = d * torch.round(q_max / d)
        bottom = -top if self._is_signed() else torch.zeros_like(top)
        return bottom - d / 2, top + d / 2

    def extra_repr(self) -> str:
        d, q_max = (t.detach() for t in self._dq())
        return (
            f"bits={self.bits}, role={self.role}, d={float(d):.4g}, q_max={float(q_max):.4g}, "
            f"b_min={self.b_min}, b_max={self.b_max}"
        )


class DQU1Quantizer(_UniformDQ):
    """U1: learns the bit width b and the step d; ``q_max = d (2^(b-1) - 1)``.

    Args:
        bits: initial bit width.
        role: ``"weight"`` or ``"activation"``.
        signed: ``None``: weights signed, activations decided by the first batch.
        b_min: smallest bit width.
        b_max: largest bit width (``None``: ``bits``).
        pow2_step: snap d to a power of two (straight-through), as the authors' code does.
    """

    def __init__(
        self,
        bits: int,
        role: str = "weight",
        signed: bool | None = None,
        b_min: int = 2,
        b_max: int | None = None,
        pow2_step: bool = False,
    ) -> None:
        super().__init__(bits, role, signed, b_min, b_max)
        self.pow2_step = pow2_step
        self.b = nn.Parameter(torch.tensor(float(bits)))
        self.d = nn.Parameter(torch.tensor(1.0))

    def _b_int(self) -> Tensor:
        return clamp_ste(round_ste(self.b), float(self._b_lo()), float(self.b_max))

    def _dq(self) -> tuple[Tensor, Tensor]:
        d = pow2_ste(self.d) if self.pow2_step else self.d
        return d, d * uniform_ratio(self._b_int(), self._is_signed())

    def _bits_cont(self) -> Tensor:
        return self._b_int()

    def _init_params(self, top: float) -> None:
        self.b.fill_(float(self._bits))
        self.d.fill_(top / uniform_ratio(self._bits, self._is_signed()))

    def clamp_(self) -> None:
        with torch.no_grad():
            self.b.clamp_(self._b_lo(), self.b_max)
            self.d.clamp_(min=1e-8)


class DQU2Quantizer(_UniformDQ):
    """U2: learns the bit width b and the range q_max; ``d = q_max / (2^(b-1) - 1)``.

    Args:
        bits: initial bit width.
        role: ``"weight"`` or ``"activation"``.
        signed: ``None``: weights signed, activations decided by the first batch.
        b_min: smallest bit width.
        b_max: largest bit width (``None``: ``bits``).
    """

    def __init__(
        self,
        bits: int,
        role: str = "weight",
        signed: bool | None = None,
        b_min: int = 2,
        b_max: int | None = None,
    ) -> None:
        super().__init__(bits, role, signed, b_min, b_max)
        self.b = nn.Parameter(torch.tensor(float(bits)))
        self.q_max = nn.Parameter(torch.tensor(1.0))

    def _b_int(self) -> Tensor:
        return clamp_ste(round_ste(self.b), float(self._b_lo()), float(self.b_max))

    def _dq(self) -> tuple[Tensor, Tensor]:
        return self.q_max / uniform_ratio(self._b_int(), self._is_signed()), self.q_max

    def _bits_cont(self) -> Tensor:
        return self._b_int()

    def _init_params(self, top: float) -> None:
        self.b.fill_(float(self._bits))
        self.q_max.fill_(top)

    def clamp_(self) -> None:
        with torch.no_grad():
            self.b.clamp_(self._b_lo(), self.b_max)
            self.q_max.clamp_(min=1e-6)


class DQU3Quantizer(_UniformDQ):
    """U3 (recommended by the paper): learns the step d and the range q_max; b is inferred.

    ``clamp_()`` keeps ``q_max / d`` between the ratios of b_min and b_max bits by moving d
    (the range is what matters for accuracy), so the inferred bit width never needs clipping
    and the grid never has more levels than ``2^bits``.

    Args:
        bits: initial bit width.
        role: ``"weight"`` or ``"activation"``.
        signed: ``None``: weights signed, activations decided by the first batch.
        b_min: smallest bit width.
        b_max: largest bit width (``None``: ``bits``).
        pow2_step: snap d to a power of two (straight-through), as the authors' code does.
    """

    def __init__(
        self,
        bits: int,
        role: str = "weight",
        signed: bool | None = None,
        b_min: int = 2,
        b_max: int | None = None,
        pow2_step: bool = False,
    ) -> None:
        super().__init__(bits, role, signed, b_min, b_max)
        self.pow2_step = pow2_step
        self.d = nn.Parameter(torch.tensor(1.0))
        self.q_max = nn.Parameter(torch.tensor(1.0))

    def _dq(self) -> tuple[Tensor, Tensor]:
        d = pow2_ste(self.d) if self.pow2_step else self.d
        return d, self.q_max

    def _init_params(self, top: float) -> None:
        self.q_max.fill_(top)
        self.d.fill_(top / uniform_ratio(self._bits, self._is_signed()))

    def _ratio_bounds(self) -> tuple[float, float]:
        """Range of ``q_max / d`` whose inferred bit width lies in [b_lo, b_max]."""
        signed = self._is_signed()
        lo = 2.0 ** (self._b_lo() - 2) if signed else 2.0 ** (self._b_lo() - 1)
        return max(lo, 1.0), float(uniform_ratio(self.b_max, signed))

    def clamp_(self) -> None:
        with torch.no_grad():
            self.q_max.clamp_(min=1e-6)
            q_max = float(self.q_max)
            r_lo, r_hi = self._ratio_bounds()
            d_lo, d_hi = q_max / r_hi, q_max / r_lo
            if self.pow2_step:
                # bounds for the snapped step 2^round(log2 d): stay inside them exactly
                d_hi = 2.0 ** math.floor(math.log2(d_hi))
                d_lo = 2.0 ** math.ceil(math.log2(d_lo))
            # the upper bound on the number of levels wins: it keeps the reported bits honest
            self.d.clamp_(min=1e-8, max=d_hi).clamp_(min=d_lo)


class DQPow2Quantizer(_LearnedPrecision):
    """Power-of-two quantizer: ``sign(x) 2^round(log2|x|)`` with magnitudes in [q_min, q_max].

    Levels are ``+-2^k`` for integer k from ``e_min = round(log2 q_min)`` to
    ``e_max = round(log2 q_max)`` (m = e_max - e_min + 1 magnitudes), plus 0 when ``with_zero``
    (values below q_min / 2 go to 0). Bits: ``ceil(log2(2 m + z))`` signed, ``ceil(log2(m + z))``
    unsigned, with z = 1 for the zero level: for signed without zero this is the paper's
    ``ceil(log2(log2(q_max / q_min) + 1) + 1)``. The levels are not uniform, so ``grid()``
    raises; use estimators that only need ``forward``/``hard`` (ste, alpha_blend, clipped_ste).

    What is learned is the parametrization's business, one subclass each:
    :class:`DQPow2P1Quantizer` (b, q_max), :class:`DQPow2P2Quantizer` (b, q_min),
    :class:`DQPow2P3Quantizer` (q_min, q_max); :func:`dq_pow2` picks one by name (``param``).
    A subclass says how its parameters give the exponents (``exponents``), the bit width
    (``_bits_cont``), which ends take the linear form's gradient (``_linear_ends``), and how
    its parameters are initialised (``_init_params``) and kept valid (``clamp_``).

    Gradients (``ste``): ``"log"`` (default, the authors' code) puts the straight-through
    estimate on the rounding in the log domain, ``2^round_ste(log2|x|)``, so inside the range
    ``dQ/dx = Q(x) / x`` (between 0.71 and 1.41) and the clipped ends pass
    ``2^round(log2 q) / q`` to the learned q_min / q_max; ``"linear"`` passes 1 to both (qexp's
    earlier form, kept as an option).

    Args:
        bits: initial bit width.
        role: ``"weight"`` or ``"activation"``.
        signed: ``None``: weights signed, activations decided by the first batch.
        with_zero: add a zero level (costs one level; needed after ReLU).
        b_min: smallest bit width.
        b_max: largest bit width (``None``: ``bits``).
        ste: ``"log"`` (the authors' gradients) or ``"linear"`` (identity), see above.
    """

    #: the levels are powers of two, not a uniform grid (estimators needing one refuse it)
    uniform_grid = False
    window_needs_grid = False  # clip_window reads the exponents
    #: the parametrization's name, as ``dq_pow2(param=...)`` spells it
    param: str = ""

    def __init__(
        self,
        bits: int,
        role: str = "weight",
        signed: bool | None = None,
        with_zero: bool = False,
        b_min: int = 2,
        b_max: int | None = None,
        ste: str = "log",
    ) -> None:
        if ste not in ("log", "linear"):
            raise ValueError(f"ste must be log | linear, got {ste!r}")
        super().__init__(bits, role, signed, b_min, b_max)
        self.ste = ste
        self.with_zero = with_zero

    # -- magnitudes <-> bits ---------------------------------------------------------------------
    def _sz(self) -> tuple[int, int]:
        return (2 if self._is_signed() else 1), int(self.with_zero)

    def magnitudes(self, bits: int | Tensor) -> int | Tensor:
        """Number of magnitudes m a bit width allows: ``floor((2^b - z) / s)``."""
        s, z = self._sz()
        if isinstance(bits, Tensor):
            return torch.floor((2**bits - z) / s)
        return (2**bits - z) // s

    def _b_lo(self) -> int:
        # at least one magnitude
        b = self.b_min
        while self.magnitudes(b) < 1:
            b += 1
        return b

    def exponents(self) -> tuple[Tensor, Tensor]:
        """(e_min, e_max): integer exponents (straight-through) of the extreme magnitudes."""
        raise NotImplementedError

    def _linear_ends(self, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
        """``ste="linear"``: the range ends (values ``lo``, ``hi``) with gradient 1 to the
        learned q_min / q_max; an end that is not learned stays as it is."""
        raise NotImplementedError

    # -- maps ------------------------------------------------------------------------------------
    def grid(self, x: Tensor) -> Grid:
        # A user-facing incompatibility, not a bug: say which combinations work.
        raise QexpError(
            "quantizer=dq_pow2 has power-of-two (non-uniform) levels, but this estimator needs "
            "a uniform grid: use estimator=ste or clipped_ste with dq_pow2"
        )

    def forward(self, x: Tensor) -> Tensor:
        self._require_calibrated()
        e_min, e_max = (e.to(x.dtype) for e in self.exponents())
        # 2^round_ste(log2 q): gradient 2^e / q to the learned ends (the authors' form)
        lo, hi = torch.exp2(e_min), torch.exp2(e_max)
        a = x.abs() if self._is_signed() else x.clamp(min=0)
        if self.ste == "log":
            # kept in the range (detached bounds) so log2 never sees 0; the branch is used only
            # inside the range, where this is the identity (where(), not clamp(): clamp's
            # gradient is halved at a bound)
            inner = torch.where(a < lo, lo.detach(), torch.where(a > hi, hi.detach(), a))
            mid = torch.exp2(round_ste(torch.log2(inner)))
        else:
            lo, hi = self._linear_ends(lo, hi)
            mid_hard = torch.exp2(torch.round(torch.log2(a.detach().clamp(min=1e-30))))
            mid = a + (mid_hard - a).detach()
        mag = torch.where(a > hi, hi, torch.where(a < lo, lo, mid))
        if self.with_zero:
            mag = torch.where(a < lo.detach() / 2, torch.zeros_like(mag), mag)
        if not self._is_signed():
            return mag
        # not sign(x): sign(0) = 0 is no level when there is no zero level
        return torch.where(x < 0, -mag, mag)

    def hard(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            return self.forward(x)

    @torch.no_grad()
    def clip_window(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Values outside this interval are clipped: up to where log-domain rounding would
        still give the largest magnitude, ``2^e_max sqrt(2)`` (tensors, no device sync; call
        after the quantizer has seen data)."""
        e_min, e_max = self.exponents()
        top = torch.exp2(e_max) * math.sqrt(2.0)
        bottom = -top if self._is_signed() else -torch.exp2(e_min) / 2
        return bottom, top

    def _q_min_for(self, top: float) -> float:
        """Initial q_min: ``m`` magnitudes (initial bit width) down from the range ``top``."""
        return 2.0 ** (round(math.log2(top)) - (self.magnitudes(self._bits) - 1))

    def extra_repr(self) -> str:
        e_min, e_max = (e.detach() for e in self.exponents())
        return (
            f"bits={self.bits}, role={self.role}, param={self.param}, "
            f"q_min=2^{int(e_min)}, q_max=2^{int(e_max)}, with_zero={self.with_zero}, "
            f"ste={self.ste}"
        )


def _value_with_unit_grad(value: Tensor, learned: Tensor) -> Tensor:
    """``value`` in the forward pass, gradient 1 to ``learned``."""
    return learned + (value - learned).detach()


class _Pow2LearnedBits(DQPow2Quantizer):
    """P1 / P2: the bit width b is learned (rounded, straight-through) and fixes the number of
    magnitudes below q_max (P1) or above q_min (P2)."""

    def _b_int(self) -> Tensor:
        return clamp_ste(round_ste(self.b), float(self._b_lo()), float(self.b_max))

    def _magnitudes_ste(self) -> Tensor:
        """m(b), with b's gradient passed straight through the step function, so that the end
        of the range that is not learned still responds to b."""
        b = self._b_int()
        return b + (self.magnitudes(b) - b).detach()

    def _bits_cont(self) -> Tensor:
        return self._b_int()

    def _clamp_b(self) -> None:
        self.b.clamp_(self._b_lo(), self.b_max)


class DQPow2P1Quantizer(_Pow2LearnedBits):
    """Power-of-two levels, P1: learns the bit width b and the largest magnitude q_max."""

    param = "p1"

    def __init__(
        self,
        bits: int,
        role: str = "weight",
        signed: bool | None = None,
        with_zero: bool = False,
        b_min: int = 2,
        b_max: int | None = None,
        ste: str = "log",
    ) -> None:
        super().__init__(bits, role, signed, with_zero, b_min, b_max, ste)
        self.b = nn.Parameter(torch.tensor(float(bits)))
        self.q_max = nn.Parameter(torch.tensor(1.0))

    def exponents(self) -> tuple[Tensor, Tensor]:
        m = self._magnitudes_ste()
        e_max = round_ste(torch.log2(self.q_max))
        return e_max - (m - 1), e_max

    def _linear_ends(self, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
        return lo, _value_with_unit_grad(hi, self.q_max)

    def _init_params(self, top: float) -> None:
        self.b.fill_(float(self._bits))
        self.q_max.fill_(top)

    def clamp_(self) -> None:
        with torch.no_grad():
            self._clamp_b()
            self.q_max.clamp_(min=1e-30)


class DQPow2P2Quantizer(_Pow2LearnedBits):
    """Power-of-two levels, P2: learns the bit width b and the smallest magnitude q_min."""

    param = "p2"

    def __init__(
        self,
        bits: int,
        role: str = "weight",
        signed: bool | None = None,
        with_zero: bool = False,
        b_min: int = 2,
        b_max: int | None = None,
        ste: str = "log",
    ) -> None:
        super().__init__(bits, role, signed, with_zero, b_min, b_max, ste)
        self.b = nn.Parameter(torch.tensor(float(bits)))
        self.q_min = nn.Parameter(torch.tensor(2.0**-8))

    def exponents(self) -> tuple[Tensor, Tensor]:
        m = self._magnitudes_ste()
        e_min = round_ste(torch.log2(self.q_min))
        return e_min, e_min + (m - 1)

    def _linear_ends(self, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
        return _value_with_unit_grad(lo, self.q_min), hi

    def _init_params(self, top: float) -> None:
        self.b.fill_(float(self._bits))
        self.q_min.fill_(self._q_min_for(top))

    def clamp_(self) -> None:
        with torch.no_grad():
            self._clamp_b()
            self.q_min.clamp_(min=1e-30)


class DQPow2P3Quantizer(DQPow2Quantizer):
    """Power-of-two levels, P3 (the paper's recommendation): learns q_min and q_max; the bit
    width is inferred, ``ceil(log2(log2(q_max / q_min) + 1) + 1)`` (signed, no zero level)."""

    param = "p3"

    def __init__(
        self,
        bits: int,
        role: str = "weight",
        signed: bool | None = None,
        with_zero: bool = False,
        b_min: int = 2,
        b_max: int | None = None,
        ste: str = "log",
    ) -> None:
        super().__init__(bits, role, signed, with_zero, b_min, b_max, ste)
        self.q_max = nn.Parameter(torch.tensor(1.0))
        self.q_min = nn.Parameter(torch.tensor(2.0**-8))

    def exponents(self) -> tuple[Tensor, Tensor]:
        return round_ste(torch.log2(self.q_min)), round_ste(torch.log2(self.q_max))

    def _bits_cont(self) -> Tensor:
        e_min, e_max = self.exponents()
        s, z = self._sz()
        return torch.log2(s * (e_max - e_min + 1) + z)

    def _linear_ends(self, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
        return _value_with_unit_grad(lo, self.q_min), _value_with_unit_grad(hi, self.q_max)

    def _init_params(self, top: float) -> None:
        self.q_max.fill_(top)
        self.q_min.fill_(self._q_min_for(top))

    def clamp_(self) -> None:
        with torch.no_grad():
            self.q_max.clamp_(min=1e-30)
            e_max = round(math.log2(float(self.q_max)))
            # fewest magnitudes whose inferred bit width still reaches b_lo
            b_lo = self._b_lo()
            m_lo = self.magnitudes(b_lo - 1) + 1 if b_lo > 1 else 1
            m_hi = self.magnitudes(self.b_max)
            # keep round(log2 q_min) within [e_max - m_hi + 1, e_max - m_lo + 1]
            lo, hi = 2.0 ** (e_max - m_hi + 1), 2.0 ** (e_max - m_lo + 1)
            self.q_min.clamp_(min=lo, max=hi)


#: the power-of-two parametrizations by the name ``dq_pow2(param=...)`` takes
POW2_PARAMETRIZATIONS: dict[str, type[DQPow2Quantizer]] = {
    "p1": DQPow2P1Quantizer,
    "p2": DQPow2P2Quantizer,
    "p3": DQPow2P3Quantizer,
}


def dq_pow2(
    bits: int,
    role: str = "weight",
    param: Literal["p1", "p2", "p3"] = "p3",
    signed: bool | None = None,
    with_zero: bool = False,
    b_min: int = 2,
    b_max: int | None = None,
    ste: Literal["log", "linear"] = "log",
) -> DQPow2Quantizer:
    """The power-of-two quantizer of parametrization ``param`` (conf/quantizer/dq_pow2.yaml's
    ``_target_``, so ``quantizer.weight.param=p1`` picks the subclass from the command line);
    the other arguments are :class:`DQPow2Quantizer`'s."""
    if param not in POW2_PARAMETRIZATIONS:
        raise ValueError(f"param must be p1 | p2 | p3, got {param!r}")
    cls = POW2_PARAMETRIZATIONS[param]
    return cls(bits, role, signed=signed, with_zero=with_zero, b_min=b_min, b_max=b_max, ste=ste)
