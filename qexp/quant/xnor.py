"""XNOR + popcount inference for 1-bit layers (the deployment claim of binary networks).

With weights ``alpha_o * sign(w)`` and inputs ``c * sign(x)``, a dot product over ``N`` terms of
+-1 values equals ``N - 2 * (number of positions where the signs differ)``. Packing the sign bits
into bytes turns "where the signs differ" into XOR and the count into a popcount, so a binarized
layer needs only bit operations, an integer sum and one float multiply per output:

    y[b, o] = alpha_o * c * (N - 2 * popcount(xbits[b] XOR wbits[o]))

Inputs on {0, r} (a 1-bit unsigned grid after ReLU) need no XNOR: with bits 1 where the input
is r, ``sum_j x_j s_j = r * (2 popcount(x AND w) - popcount(x))``.

This module computes both with integer tensors (the bit kernels of qexp.bitops), and runs a
QLinear / QConv2d layer that way from its *deployed* weight (``deployed_weight()``) and its
input quantizer's two levels (:func:`xnor_layer_forward`), so tests can check it against the
float computation of the deployed layer. Where it applies: layers whose deployed weights are
``+-a`` per output channel and whose inputs have two levels, ``{-c, c}`` or ``{0, r}``; in
qexp's runs that is the body layers of ``bits=1`` (``w_bits=1 a_bits=1``) with
``quantizer=binary``, ``uniform`` (ReLU networks) or ``dorefa``, with any estimator whose
deployed weights are binary (``quantnet`` included).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from qexp.bitops import pack_bits, popcount, sign_bits, xnor_conv2d_dots, xnor_dot

__all__ = [
    "and_conv2d",
    "and_dot",
    "and_linear",
    "pack_bits",
    "popcount",
    "sign_bits",
    "xnor_conv2d",
    "xnor_dot",
    "xnor_layer_forward",
    "xnor_linear",
]

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
    dots = xnor_conv2d_dots(sign_bits(x), sign_bits(weight), stride, padding, dilation)
    scale = torch.as_tensor(w_scale, dtype=torch.float32, device=x.device).reshape(-1) * act_scale
    return dots.to(torch.float32) * scale[None, :, None, None]


def _pair(v: int | tuple[int, int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def and_dot(x_words: Tensor, w_words: Tensor) -> Tensor:
    """Dot products of {0, 1} inputs with +-1 weights from packed bits (x: 1, w: +1).

    ``sum_j x_j s_j = popcount(x AND w) - popcount(x AND NOT w) = 2 popcount(x AND w) -
    popcount(x)`` per (row, output): an AND, two popcounts and an integer subtraction.

    Args:
        x_words: (B, K) packed input bits (1 where the input is at its nonzero level).
        w_words: (O, K) packed weight signs.

    Returns:
        (B, O) int64.
    """
    both = torch.bitwise_and(x_words[:, None, :], w_words[None, :, :])
    ones = popcount(x_words).sum(dim=-1, dtype=torch.int64)[:, None]
    return 2 * popcount(both).sum(dim=-1, dtype=torch.int64) - ones


def and_linear(x_bits: Tensor, weight: Tensor, w_scale: Tensor, act_level: float) -> Tensor:
    """``F.linear(act_level * x_bits, w_scale[:, None] * sign(weight))`` via AND + popcount."""
    dots = and_dot(pack_bits(x_bits), pack_bits(sign_bits(weight)))
    scale = torch.as_tensor(w_scale, dtype=torch.float32, device=x_bits.device).reshape(-1)
    return dots.to(torch.float32) * (scale * act_level)[None, :]


def and_conv2d(
    x_bits: Tensor,
    weight: Tensor,
    w_scale: Tensor,
    act_level: float,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
) -> Tensor:
    """Conv2d (groups=1) of {0, act_level} inputs with +-w_scale weights via AND + popcount.

    Zero padding is the input's own 0 level, so padded positions are plain 0 bits.
    """
    b, _, h, w = x_bits.shape
    o, _, kh, kw = weight.shape
    kw_args = {"kernel_size": (kh, kw), "stride": stride, "padding": padding, "dilation": dilation}
    cols = F.unfold(x_bits.float(), **kw_args)  # (B, C*kh*kw, L)
    locs = cols.shape[2]
    rows = cols.transpose(1, 2).reshape(b * locs, cols.shape[1]) > 0.5
    dots = and_dot(pack_bits(rows), pack_bits(sign_bits(weight.reshape(o, -1))))
    scale = torch.as_tensor(w_scale, dtype=torch.float32, device=x_bits.device).reshape(-1)
    out = (dots.to(torch.float32) * (scale * act_level)[None, :]).reshape(b, locs, o)
    return out.transpose(1, 2).reshape(b, o, *_out_hw(h, w, kh, kw, stride, padding, dilation))


def _out_hw(h, w, kh, kw, stride, padding, dilation) -> tuple[int, int]:
    sh, sw = _pair(stride)
    ph, pw = _pair(padding)
    dh, dw = _pair(dilation)
    return (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1


def binary_weight(layer: torch.nn.Module) -> tuple[Tensor, Tensor]:
    """(deployed weight, per-output-channel magnitude) of a layer deployed as ``+-a_o``.

    Reads ``layer.deployed_weight()`` (so methods whose deployed signs are not ``sign(w)``,
    e.g. the QuantNet-style meta quantizer, are honoured) and raises ValueError unless every
    output channel holds only ``+a_o`` and ``-a_o``.
    """
    w = layer.deployed_weight().detach()
    rows = w.reshape(w.shape[0], -1)
    scale = rows.abs().amax(dim=1)
    if not torch.equal(rows.abs(), scale[:, None].expand_as(rows)):
        raise ValueError(
            "XNOR/AND inference needs deployed weights +-a per output channel (1-bit weights)"
        )
    return w, scale


def binary_input(layer: torch.nn.Module, x: Tensor) -> tuple[str, Tensor, float]:
    """How a layer's deployed input is binary: ``("xnor", signs, c)`` for levels {-c, c},
    ``("and", bits, r)`` for {0, r}; ValueError for anything else.

    The levels come from the input quantizer's 2-level grid and the bits from its hard output,
    so they describe exactly what the float forward computes with.
    """
    aq = getattr(layer, "a_quant", None)
    if aq is None:
        raise ValueError("XNOR/AND inference needs a quantized (1-bit) layer input")
    xq = aq.hard(x)
    grid = aq.grid(x)
    step = torch.as_tensor(grid.step)
    if grid.num_levels != 2 or step.numel() != 1:
        raise ValueError("XNOR/AND inference needs a 1-bit, per-tensor input grid")
    lo, hi = float(grid.low), float(grid.low + step)
    on = xq > (lo + hi) / 2
    if not torch.equal(torch.where(on, hi, lo).to(xq.dtype), xq):
        raise ValueError("the layer's input is not on its 2-level grid")
    if lo == -hi:
        return "xnor", on, hi
    if lo == 0.0:
        return "and", on, hi
    raise ValueError(f"input levels {{{lo:g}, {hi:g}}} are neither {{-c, c}} nor {{0, r}}")


def xnor_layer_forward(layer: torch.nn.Module, x: Tensor) -> Tensor:
    """The deployed output of a 1-bit QLinear / QConv2d computed with bit operations.

    Applies to layers whose deployed weights are ``+-a_o`` per output channel (binary,
    1-bit uniform, 1-bit DoReFa, QuantNet at 1 bit) and whose input quantizer has two levels:
    ``{-c, c}`` (BinaryNet's sign activations) runs as XNOR + popcount, ``{0, r}`` (a 1-bit
    unsigned grid after ReLU) as AND + popcount. Other layers raise ValueError. The bias, if
    any, is added in float.
    """
    from qexp.quant.layers import QConv2d, QLinear

    with torch.no_grad():
        w, w_scale = binary_weight(layer)
        kind, on, level = binary_input(layer, x)
        if isinstance(layer, QLinear):
            if kind == "xnor":
                signs = torch.where(on, 1.0, -1.0)
                out = xnor_linear(signs, w, w_scale, level)
            else:
                out = and_linear(on, w, w_scale, level)
            bias_shape: tuple[int, ...] = (1, -1)
        elif isinstance(layer, QConv2d):
            if layer.groups != 1 or layer.padding_mode != "zeros" or isinstance(layer.padding, str):
                raise ValueError("xnor_conv2d supports groups=1 and numeric zero padding only")
            geo = (layer.stride, layer.padding, layer.dilation)
            if kind == "xnor":
                signs = torch.where(on, 1.0, -1.0)
                out = xnor_conv2d(signs, w, w_scale, level, *geo)
            else:
                out = and_conv2d(on, w, w_scale, level, *geo)
            bias_shape = (1, -1, 1, 1)
        else:
            raise ValueError(f"not a quantized Linear/Conv2d layer: {type(layer).__name__}")
        if layer.bias is not None:
            out = out + layer.bias.reshape(bias_shape)
    return out.to(x.dtype)
