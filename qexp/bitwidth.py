"""qexp's bit-width vocabulary: the values ``bits`` / ``w_bits`` / ``a_bits`` may take.

A bit width is an integer 1..16, 32 (full precision, no quantizer), or the float ``1.58``:
ternary, three levels ``{-s, 0, +s}`` (log2 3 = 1.58), the name ParetoQ (Liu et al. 2025) and
BitNet b1.58 use. (ParetoQ's own code spells ternary ``w_bits=0``; qexp uses the number its
tables print.) Integers stay Python ints everywhere, so a config with ``w_bits: 4`` resolves,
prints and hashes exactly as before 1.58 existed.

Storage: a ternary weight is counted at **2 bits** (what a packed export writes: two bits per
weight, one code unused), not log2 3; every size (layer table ``kb``, ``weight_kb``, cost
report ``weight_bytes`` and BOPs, memory budgets) reads :func:`storage_bits`. The level check
allows 3 distinct values (:func:`max_levels`).

Pure Python (no torch, no OmegaConf): the config checks, the layer rules and the quantizers all
read it.
"""

from __future__ import annotations

from typing import Any

#: the ternary bit width, as written in configs, sweeps and tables
TERNARY_BITS = 1.58
#: bits that mean "not quantized"
FLOAT_BITS = 32
#: bits a ternary weight is stored in (sizes, BOPs, budgets)
TERNARY_STORAGE_BITS = 2
#: the allowed values, for messages
BITS_ALLOWED = "an integer from 1 to 16, 1.58 (ternary), or 32 for full precision"


def is_ternary(bits: Any) -> bool:
    """Whether ``bits`` is the ternary width 1.58 (a float: the int 2 is not ternary)."""
    return isinstance(bits, float) and bits == TERNARY_BITS


def valid_bits(value: Any) -> bool:
    """True for a usable bit width: an int 1..16 or 32, or exactly 1.58."""
    if is_ternary(value):
        return True
    return (
        isinstance(value, int)
        and not isinstance(value, bool)
        and (1 <= value <= 16 or value == FLOAT_BITS)
    )


def as_bits(value: Any) -> int | float:
    """A checked bit width as qexp carries it: 1.58 stays the float 1.58, anything else an int
    (where older code wrote ``int(bits)``, which would turn 1.58 into 1)."""
    return TERNARY_BITS if is_ternary(value) else int(value)


def storage_bits(bits: Any) -> int:
    """Bits each value is stored in: 2 for ternary, else the width itself."""
    return TERNARY_STORAGE_BITS if is_ternary(bits) else int(bits)


def max_levels(bits: Any) -> int:
    """The most distinct values a grid of ``bits`` may have: 3 for ternary, else 2**bits."""
    return 3 if is_ternary(bits) else 2 ** int(bits)


def bits_label(bits: Any) -> str:
    """How tables and names print a width: ``1.58``, ``4``, ``fp`` for full precision."""
    if is_ternary(bits):
        return "1.58"
    return "fp" if int(bits) >= FLOAT_BITS else str(int(bits))
