"""Honesty checks of a trained quantized network: levels per layer and packed weight size."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from qexp.quant.layers import QuantLayer, quant_layers


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
    per-token quantizers}, kb (weight memory at w_bits) and ok (levels within 2**bits).
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
                "w_bits": layer.w_bits,
                "a_bits": layer.a_bits,
                "params": n,
                "kb": n * layer.w_bits / 8 / 1024,
                "levels": {"weight": w_lv, "activation": a_lv},
                "ok": (layer.w_bits >= 32 or w_lv <= 2**layer.w_bits)
                and (layer.a_bits >= 32 or a_lv <= 2**layer.a_bits),
            }
        )
    return table


def weight_kb(table: list[dict[str, Any]]) -> float:
    """Packed size in KB of the quantizable layers' weights at their bit widths.

    Biases, BatchNorm parameters and per-channel scales are not counted (as in Uhlich et al.).
    """
    return float(sum(row["kb"] for row in table))
