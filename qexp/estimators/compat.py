"""What estimators may assume about quantizers, and the check that a pairing works.

Estimators that build on a quantizer's grid (AQE's stand-in, QuantNet's staircase, clipped
STE's window) need two things from it: a uniform grid (``Quantizer.grid``), and the tensor that
grid's levels apply to. For most quantizers that tensor is the input itself; DoReFa's k-bit
weights first go through ``tanh(w) / max|tanh(w)|`` (``grid_input``). An estimator that cannot
work with a quantizer says so in ``check_quantizer``, which the command-line preflight calls
before any job starts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor

from qexp.errors import QexpError
from qexp.quant.base import Quantizer

if TYPE_CHECKING:
    from qexp.estimators.base import Estimator


def grid_input(quant: Quantizer, x: Tensor) -> Tensor:
    """The tensor whose values ``quant.grid(x)`` describes (differentiable): ``x`` itself
    unless the quantizer maps it first (``grid_input`` method, e.g. DoReFa weights)."""
    return quant.grid_input(x)


def has_uniform_grid(quant: Quantizer) -> bool:
    """Whether ``quant.grid()`` describes its levels (False for power-of-two levels)."""
    return quant.uniform_grid


def refuse_without_grid(estimator: str, role: str, quant: Quantizer, hint: str) -> None:
    """Raise the one-line error for an estimator that needs a uniform grid ``quant`` lacks."""
    if has_uniform_grid(quant):
        return
    raise QexpError(
        f"estimator={estimator} needs a uniform grid for the {role}s, but "
        f"{type(quant).__name__} has non-uniform (power-of-two) levels: {hint}"
    )


def check_pairing(
    estimator: Estimator, w_quant: Quantizer | None, a_quant: Quantizer | None
) -> None:
    """Raise QexpError if ``estimator`` cannot train body layers with these quantizers.

    Each estimator says so in ``check_quantizer(role, quant)``; a wrapping estimator (block
    replacement) also asks the estimator it wraps, since that one trains the same layers.
    """
    for role, quant in (("weight", w_quant), ("activation", a_quant)):
        if quant is not None:
            estimator.check_quantizer(role, quant)
