"""Bit packing of unsigned integer codes at any width from 1 to 16 bits.

Codes are written as one little-endian bit stream: code i occupies bits ``i*b .. i*b + b - 1``
(least significant bit first), so ``n`` codes of ``b`` bits take ``ceil(n * b / 8)`` bytes
(1 bit: 8 codes per byte).
"""

from __future__ import annotations

import numpy as np

MAX_BITS = 16


def packed_size(count: int, bits: int) -> int:
    """Bytes that ``count`` codes of ``bits`` bits take packed."""
    return (count * bits + 7) // 8


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack non-negative integer ``codes`` (any shape, flattened in C order) into uint8."""
    if not 1 <= bits <= MAX_BITS:
        raise ValueError(f"bits must be in 1..{MAX_BITS}, got {bits}")
    flat = np.asarray(codes).reshape(-1).astype(np.int64)
    if flat.size and (flat.min() < 0 or flat.max() >= 2**bits):
        raise ValueError(f"codes must lie in 0..{2**bits - 1}")
    planes = (flat[:, None] >> np.arange(bits, dtype=np.int64)) & 1
    return np.packbits(planes.astype(np.uint8).reshape(-1), bitorder="little")


def unpack_codes(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """The first ``count`` codes of ``bits`` bits from ``packed`` (uint8), as int64."""
    if not 1 <= bits <= MAX_BITS:
        raise ValueError(f"bits must be in 1..{MAX_BITS}, got {bits}")
    if packed.size < packed_size(count, bits):
        raise ValueError(f"{packed.size} bytes hold fewer than {count} codes of {bits} bits")
    planes = np.unpackbits(packed.reshape(-1), count=count * bits, bitorder="little")
    planes = planes.reshape(count, bits).astype(np.int64)
    return planes @ (np.int64(1) << np.arange(bits, dtype=np.int64))
