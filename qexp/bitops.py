"""Bit-level integer kernels for 1-bit layers: sign packing, popcount, XNOR dot products.

Pure torch, no other qexp imports, so both the quantized layers (qexp.quant.xnor) and the
verifier of exported networks (qexp.export.verify, which must not depend on qexp's training
modules) compute binary layers with the same kernels.

With +-1 vectors of length N, ``dot = N - 2 * popcount(a XOR b)``: packing the sign bits into
bytes makes a dot product an XOR, a popcount and an integer subtraction.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

#: number of set bits of every byte value 0..255
_POPCOUNT8 = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.int32)


def sign_bits(x: Tensor) -> Tensor:
    """1 where ``x >= 0`` (the +1 level; sign(0) = +1 as in BinaryQuantizer), else 0, as bool."""
    return x >= 0


def pack_bits(bits: Tensor) -> Tensor:
    """Pack the last dim of a bool tensor into uint8 words (big-endian in each byte, zero pad)."""
    n = bits.shape[-1]
    pad = (-n) % 8
    b = F.pad(bits.to(torch.uint8), (0, pad)) if pad else bits.to(torch.uint8)
    b = b.reshape(*b.shape[:-1], -1, 8)
    weights = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8, device=b.device)
    # each byte's bits are disjoint, so the sum is an OR and stays below 256
    return (b * weights).sum(dim=-1, dtype=torch.int32).to(torch.uint8)


def popcount(words: Tensor) -> Tensor:
    """Set bits of each uint8 word, as int32."""
    return _POPCOUNT8.to(words.device)[words.long()]


def xnor_dot(x_words: Tensor, w_words: Tensor, n: int, mask_words: Tensor | None = None) -> Tensor:
    """Integer +-1 dot products from packed signs: ``N - 2 popcount(x XOR w)`` per (row, output).

    Args:
        x_words: (B, K) packed input signs.
        w_words: (O, K) packed weight signs.
        n: number of valid bits per row (the padding bits are zero in both, so they never count).
        mask_words: optional (B, K) packed validity bits; only positions set there count and
            ``N`` becomes their number per row (used for zero padding in convolutions).

    Returns:
        (B, O) int64 dot products of the +-1 vectors.
    """
    diff = torch.bitwise_xor(x_words[:, None, :], w_words[None, :, :])
    if mask_words is None:
        n_valid = torch.full((x_words.shape[0], 1), n, dtype=torch.int64, device=x_words.device)
    else:
        diff = torch.bitwise_and(diff, mask_words[:, None, :])
        n_valid = popcount(mask_words).sum(dim=-1, dtype=torch.int64)[:, None]
    return n_valid - 2 * popcount(diff).sum(dim=-1, dtype=torch.int64)


def _pair(v: int | tuple[int, int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def xnor_conv2d_dots(
    x_signs: Tensor,
    w_signs: Tensor,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
) -> Tensor:
    """Integer conv2d (groups=1) of +-1 inputs and weights by XNOR + popcount over patches.

    Args:
        x_signs: (B, C, H, W) bool, True for +1.
        w_signs: (O, C, kh, kw) bool, True for +1.

    Zero padding adds zeros, which are neither +1 nor -1: a packed validity mask drops those
    positions from the count, matching a float conv2d of the +-1 values with zero padding.

    Returns:
        (B, O, H_out, W_out) int64 dot products.
    """
    b, _, h, w = x_signs.shape
    o, _, kh, kw = w_signs.shape
    kw_args = {"kernel_size": (kh, kw), "stride": stride, "padding": padding, "dilation": dilation}
    bits = F.unfold(x_signs.float(), **kw_args)  # (B, C*kh*kw, L); padding gives 0
    valid = F.unfold(torch.ones_like(x_signs, dtype=torch.float32), **kw_args)
    n_patch, locs = bits.shape[1], bits.shape[2]
    rows = bits.transpose(1, 2).reshape(b * locs, n_patch) > 0.5
    mask = valid.transpose(1, 2).reshape(b * locs, n_patch) > 0.5
    w_words = pack_bits(w_signs.reshape(o, -1))
    dots = xnor_dot(pack_bits(rows & mask), w_words, n_patch, pack_bits(mask))
    sh, sw = _pair(stride)
    ph, pw = _pair(padding)
    dh, dw = _pair(dilation)
    out_h = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    out_w = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    return dots.reshape(b, locs, o).transpose(1, 2).reshape(b, o, out_h, out_w)
