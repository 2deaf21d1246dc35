"""The optimizer and its parameter groups (weights, no-decay, quantizer, estimator)."""

from __future__ import annotations

from typing import Any

import torch

from qexp.estimators.model import QuantModel
from qexp.quant.base import Quantizer
from qexp.spec import TrainerSettings


def param_groups(model: QuantModel, tcfg: TrainerSettings) -> list[dict[str, Any]]:
    """Split parameters into groups, each remembering its own base LR as ``base_lr``.

    Conv/linear weights get ``weight_decay``; biases and BatchNorm get none; learnable quantizer
    parameters get ``quantizer_lr`` and no decay; the estimator adds its own groups.
    """
    decay, no_decay, quant = [], [], []
    for module in model.net.modules():
        own = [p for p in module.parameters(recurse=False) if p.requires_grad]
        if isinstance(module, Quantizer):
            quant += own
        else:
            for p in own:
                (decay if p.ndim >= 2 else no_decay).append(p)
    lr = float(tcfg.lr)
    groups = [
        {"name": "weights", "params": decay, "lr": lr, "weight_decay": float(tcfg.weight_decay)},
        {"name": "no_decay", "params": no_decay, "lr": lr, "weight_decay": 0.0},
    ]
    if quant:
        qlr = float(tcfg.quantizer_lr) if tcfg.quantizer_lr is not None else lr
        groups.append({"name": "quantizer", "params": quant, "lr": qlr, "weight_decay": 0.0})
    for i, g in enumerate(model.estimator.param_groups(lr)):
        groups.append({"name": f"estimator{i}", **g})
    groups = [g for g in groups if g["params"]]
    for g in groups:
        g["base_lr"] = g["lr"]
    return groups


def build_optimizer(model: QuantModel, tcfg: TrainerSettings) -> torch.optim.Optimizer:
    """sgd | adam | adamw over :func:`param_groups`."""
    groups = param_groups(model, tcfg)
    name = tcfg.optimizer
    if name == "sgd":
        return torch.optim.SGD(groups, lr=tcfg.lr, momentum=tcfg.momentum, nesterov=tcfg.nesterov)
    if name == "adam":
        return torch.optim.Adam(groups, lr=tcfg.lr)
    return torch.optim.AdamW(groups, lr=tcfg.lr)


def set_lr(optimizer: torch.optim.Optimizer, multiplier: float) -> float:
    """Scale every group's base LR by ``multiplier``; return the first group's LR."""
    for g in optimizer.param_groups:
        g["lr"] = g["base_lr"] * multiplier
    return optimizer.param_groups[0]["lr"]
