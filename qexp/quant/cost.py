"""Inference cost of a quantized network, per quantized layer and in total.

For each quantized Conv2d / Linear, per input sample:

- ``macs``: multiply-accumulates (output values x (input channels / groups) x kernel size);
- ``bops``: bit operations, ``macs * w_bits * a_bits`` (the usual BOPs measure; a layer left
  at full precision counts 32 bits);
- ``weight_bytes``: the weight packed at ``w_bits`` (``ceil(params * w_bits / 8)``, what
  ``qexp export`` writes; scales, biases and BatchNorm are not counted);
- ``act_bytes``: the layer's input activation at ``a_bits`` (``ceil(values * a_bits / 8)``).

An embedding (QEmbedding) is a lookup: its table counts in ``weight_bytes``, it does no
multiply-accumulates, and its input (token ids) is no activation. A quantized product of two
activations (QMatMul, ``layers.matmul_bits``) has no weight: its macs are those of ``a @ b``,
its bops ``macs * bits * bits`` and its ``act_bytes`` both operands at its bits. Products left
in float (the default) are not counted, like every operation outside the quantized layers.

Totals sum macs, bops and weight bytes over the layers; for activations they give both the
largest layer input (``act_bytes_max``, the buffer a layer-by-layer engine needs) and the sum
(``act_bytes_sum``). Operations outside the quantized layers (BatchNorm, pooling, additions)
are not counted.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from qexp.quant.layers import (
    QConv2d,
    QEmbedding,
    QuantLayer,
    quant_layers,
    quant_matmuls,
    quant_mode,
)


def layer_macs(layer: QuantLayer, out: Tensor) -> int:
    """Multiply-accumulates of ``layer`` per sample, given its output ``out`` (batch first)."""
    per_sample = out[0].numel() if out.dim() > 1 else out.numel()
    w = layer.weight
    if isinstance(layer, QEmbedding):
        return 0  # a table lookup
    if isinstance(layer, QConv2d):
        return per_sample * (w.shape[1] * w[0, 0].numel())  # (C_in / groups) * kh * kw
    return per_sample * w.shape[1]


@torch.no_grad()
def cost_report(net: nn.Module, example: Tensor) -> dict[str, Any]:
    """Per-layer and total cost of ``net``'s quantized layers, measured on ``example``.

    The forward runs in eval mode with quantization off (shapes only; no quantizer or
    BatchNorm state changes). Returns ``{"layers": [...], "total": {...}}``.
    """
    shapes: dict[str, tuple[int, int]] = {}
    hooks = []
    for name, layer in quant_layers(net):

        def record(mod: nn.Module, args: tuple, out: Tensor, name: str = name) -> None:
            x = args[0]
            values = x[0].numel() if x.dim() > 1 else x.numel()
            if isinstance(mod, QEmbedding):
                values = 0  # token ids are no activation
            shapes[name] = (values, layer_macs(mod, out))

        hooks.append(layer.register_forward_hook(record))
    for name, product in quant_matmuls(net):

        def record_product(mod: nn.Module, args: tuple, out: Tensor, name: str = name) -> None:
            a, b = args[0], args[1]
            # per sample: every output value sums a's last dimension; both operands are read
            shapes[name] = (a[0].numel() + b[0].numel(), out[0].numel() * a.shape[-1])

        hooks.append(product.register_forward_hook(record_product))
    was_training = net.training
    net.eval()
    try:
        with quant_mode(net, "off"):
            net(example[:1])
    finally:
        net.train(was_training)
        for h in hooks:
            h.remove()
    rows = []
    for name, layer in quant_layers(net):
        act_values, macs = shapes.get(name, (0, 0))
        w_bits, a_bits = int(layer.w_bits), int(layer.a_bits)
        rows.append(
            {
                "name": name,
                "w_bits": w_bits,
                "a_bits": a_bits,
                "macs": macs,
                "bops": macs * w_bits * a_bits,
                "weight_bytes": math.ceil(layer.weight.numel() * w_bits / 8),
                "act_bytes": math.ceil(act_values * a_bits / 8),
            }
        )
    for name, product in quant_matmuls(net):
        act_values, macs = shapes.get(name, (0, 0))
        bits = int(product.a_bits)
        rows.append(
            {
                "name": name,
                "w_bits": bits,  # the second operand plays the weight's part
                "a_bits": bits,
                "macs": macs,
                "bops": macs * bits * bits,
                "weight_bytes": 0,
                "act_bytes": math.ceil(act_values * bits / 8),
            }
        )
    total = {key: sum(r[key] for r in rows) for key in ("macs", "bops", "weight_bytes")}
    total["act_bytes_max"] = max((r["act_bytes"] for r in rows), default=0)
    total["act_bytes_sum"] = sum(r["act_bytes"] for r in rows)
    return {"layers": rows, "total": total}


def cost_metrics(net: nn.Module, example: Tensor) -> dict[str, Any]:
    """The metrics.json entries of the cost report: ``macs`` and ``bops`` (totals, for
    ``qexp compare --x bops``) and ``cost`` (per layer and total)."""
    report = cost_report(net, example)
    return {"macs": report["total"]["macs"], "bops": report["total"]["bops"], "cost": report}
