"""Honesty checks of a trained quantized network: levels per layer and packed weight size."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from qexp.bitwidth import FLOAT_BITS, TERNARY_BITS
from qexp.quant.base import Quantizer
from qexp.quant.layers import QMatMul, QuantLayer, quant_layers, quant_matmuls


def distinct_per_row(t: Tensor) -> Tensor:
    """Number of distinct values in each row of a 2-D tensor."""
    s = t.sort(dim=1).values
    return 1 + (s[:, 1:] != s[:, :-1]).sum(dim=1)


def weight_levels(layer: QuantLayer) -> int:
    """Largest number of distinct deployed weight values in any output channel."""
    with torch.no_grad():
        w = layer.deployed_weight()  # what the eval forward computes with (estimator-aware)
        return int(distinct_per_row(w.detach().float().reshape(w.shape[0], -1)).max())


def layer_table(model: torch.nn.Module, batch: Tensor) -> list[dict[str, Any]]:
    """Per-layer facts of the deployed network, measured on ``batch``.

    Each entry: name, kind, role, w_bits, a_bits, params, levels {weight: max distinct values
    per output channel, activation: distinct values of the quantized input, per token for
    per-token quantizers}, kb (weight memory at the stored bits: a ternary weight, w_bits 1.58,
    counts 2 bits) and ok (levels within the grid's: 3 for ternary, else 2**bits).
    """
    seen: dict[str, int] = {}
    hooks = []
    for name, layer in quant_layers(model):

        def record(mod: QuantLayer, args: tuple, name: str = name) -> None:
            x = args[0]
            xq = mod.a_quant.hard(x) if mod.a_quant is not None else x
            if getattr(mod.a_quant, "per_token", False):  # one grid per token: count per token
                rows = xq.detach().float().reshape(-1, xq.shape[-1])
                seen[name] = int(distinct_per_row(rows).max())
            else:
                seen[name] = int(torch.unique(xq.detach().float()).numel())

        hooks.append(layer.register_forward_pre_hook(record))
    for name, product in quant_matmuls(model):

        def record_product(mod: QMatMul, args: tuple, name: str = name) -> None:
            a, b = args  # per-token grids: distinct values per row of a, per column of b
            rows_a = mod.a_quant.hard(a).detach().float().reshape(-1, a.shape[-1])
            rows_b = mod.b_quant.hard(b.transpose(-2, -1)).detach().float()
            seen[name] = int(max(distinct_per_row(rows_a).max(),
                                 distinct_per_row(rows_b.reshape(-1, b.shape[-2])).max()))

        hooks.append(product.register_forward_pre_hook(record_product))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(batch)
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    table = []
    for name, layer in quant_layers(model):
        w_lv, a_lv = weight_levels(layer), seen.get(name, 0)
        n = layer.weight.numel()
        table.append(
            {
                "name": name,
                "kind": type(layer).__name__,
                "role": layer.layer_role,
                "w_bits": _nominal_bits(layer.w_quant),
                "a_bits": _nominal_bits(layer.a_quant),
                "params": n,
                "kb": n * layer.w_bits / 8 / 1024,  # storage bits: 2 for ternary
                "levels": {"weight": w_lv, "activation": a_lv},
                "ok": _within(layer.w_quant, w_lv) and _within(layer.a_quant, a_lv),
            }
        )
    for name, product in quant_matmuls(model):  # no weight: the inputs' levels only
        a_lv = seen.get(name, 0)
        table.append({"name": name, "kind": "QMatMul", "role": "product", "w_bits": FLOAT_BITS,
                      "a_bits": product.a_bits, "params": 0, "kb": 0.0,
                      "levels": {"weight": 0, "activation": a_lv},
                      "ok": _within(product.a_quant, a_lv)})  # fmt: skip
    return table


def _nominal_bits(q: Quantizer | None) -> float:
    """A side's bits as the run names them: 1.58 for a ternary quantizer (stored in 2), 32
    for none."""
    if q is None:
        return FLOAT_BITS
    return TERNARY_BITS if q.ternary else q.bits


def _within(q: Quantizer | None, levels: int) -> bool:
    """Whether ``levels`` distinct values fit the quantizer's grid (3 for ternary, else
    2**bits; anything for a side left in float)."""
    return q is None or q.bits >= FLOAT_BITS or levels <= q.max_levels


def weight_kb(table: list[dict[str, Any]]) -> float:
    """Packed size in KB of the quantizable layers' weights at their bit widths.

    Biases, BatchNorm parameters and per-channel scales are not counted (as in Uhlich et al.).
    """
    return float(sum(row["kb"] for row in table))
