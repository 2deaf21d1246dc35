"""XNOR + popcount inference for 1-bit layers (the deployment claim of binary networks).

With weights ``alpha_o * sign(w)`` and inputs ``c * sign(x)``, a dot product over ``N`` terms of
+-1 values equals ``N - 2 * (number of positions where the signs differ)``. Packing the sign bits
into bytes turns "where the signs differ" into XOR and the count into a popcount, so a binarized
layer needs only bit operations, an integer sum and one float multiply per output:

    y[b, o] = alpha_o * c * (N - 2 * popcount(xbits[b] XOR wbits[o]))

This module computes that with integer tensors (a byte-wise popcount table) and offers the
same for QLinear / QConv2d layers that use ``BinaryQuantizer`` weights and activations, so
tests can check it against the float computation of the deployed layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from qexp.quant.binary import BinaryQuantizer

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


def xnor_linear(x: Tensor, weight: Tensor, w_scale: Tensor, act_scale: float = 1.0) -> Tensor:
    """``F.linear(act_scale * sign(x), w_scale[:, None] * sign(weight))`` via XNOR + popcount.

    Args:
        x: (B, N) inputs; only their signs are used.
        weight: (O, N) latent weights; only their signs are used.
        w_scale: (O,) or scalar weight magnitude (BinaryQuantizer: mean |w| per channel).
        act_scale: magnitude of the binarized inputs.
    """
    n = x.shape[-1]
    dots = xnor_dot(pack_bits(sign_bits(x)), pack_bits(sign_bits(weight)), n)
    scale = torch.as_tensor(w_scale, dtype=torch.float32, device=x.device).reshape(-1) * act_scale
    return dots.to(torch.float32) * scale[None, :]


def xnor_conv2d(
    x: Tensor,
    weight: Tensor,
    w_scale: Tensor,
    act_scale: float = 1.0,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
) -> Tensor:
    """Binarized conv2d (groups=1) as XNOR + popcount over unfolded patches.

    Zero padding adds zeros, which are neither +1 nor -1: a packed validity mask drops those
    positions from the count, matching ``conv2d(act_scale * sign(x), ..., padding=p)``.
    """
    b, _, h, w = x.shape
    o, _, kh, kw = weight.shape
    kw_args = {"kernel_size": (kh, kw), "stride": stride, "padding": padding, "dilation": dilation}
    bits = F.unfold(sign_bits(x).float(), **kw_args)  # (B, C*kh*kw, L); padding gives 0
    valid = F.unfold(torch.ones_like(x[:, :1]).expand_as(x).contiguous(), **kw_args)
    n_patch = bits.shape[1]
    locs = bits.shape[2]
    rows = bits.transpose(1, 2).reshape(b * locs, n_patch) > 0.5
    mask = valid.transpose(1, 2).reshape(b * locs, n_patch) > 0.5
    w_words = pack_bits(sign_bits(weight.reshape(o, -1)))
    dots = xnor_dot(pack_bits(rows & mask), w_words, n_patch, pack_bits(mask))
    scale = torch.as_tensor(w_scale, dtype=torch.float32, device=x.device).reshape(-1) * act_scale
    out = (dots.to(torch.float32) * scale[None, :]).reshape(b, locs, o).transpose(1, 2)
    sh, sw = _pair(stride)
    ph, pw = _pair(padding)
    dh, dw = _pair(dilation)
    out_h = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    out_w = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    return out.reshape(b, o, out_h, out_w)


def _pair(v: int | tuple[int, int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def xnor_layer_forward(layer: torch.nn.Module, x: Tensor) -> Tensor:
    """The deployed output of a binary QLinear / QConv2d computed with XNOR + popcount.

    The layer must use ``BinaryQuantizer`` for both weight and input (a body layer of a
    ``quantizer=binary bits=1`` run); its bias, if any, is added in float.
    """
    from qexp.quant.layers import QConv2d, QLinear

    wq, aq = getattr(layer, "w_quant", None), getattr(layer, "a_quant", None)
    if not (isinstance(wq, BinaryQuantizer) and isinstance(aq, BinaryQuantizer)):
        raise ValueError("XNOR inference needs BinaryQuantizer weights and activations")
    with torch.no_grad():
        w = layer.weight
        w_scale = wq.magnitude(w).reshape(-1)
        if isinstance(layer, QLinear):
            out = xnor_linear(x, w, w_scale, aq.act_scale)
            bias_shape: tuple[int, ...] = (1, -1)
        elif isinstance(layer, QConv2d):
            if layer.groups != 1 or layer.padding_mode != "zeros" or isinstance(layer.padding, str):
                raise ValueError("xnor_conv2d supports groups=1 and numeric zero padding only")
            out = xnor_conv2d(
                x, w, w_scale, aq.act_scale, layer.stride, layer.padding, layer.dilation
            )
            bias_shape = (1, -1, 1, 1)
        else:
            raise ValueError(f"not a quantized Linear/Conv2d layer: {type(layer).__name__}")
        if layer.bias is not None:
            out = out + layer.bias.reshape(bias_shape)
    return out.to(x.dtype)
