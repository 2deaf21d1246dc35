"""Accuracy of a quantized model on one split, with its quantized layers in a chosen mode."""

from __future__ import annotations

import contextlib

import torch

from qexp.data.base import DataModule
from qexp.estimators.model import QuantModel
from qexp.quant.layers import quant_mode
from qexp.train.distributed import SINGLE, DistInfo, eval_shard, sum_over_ranks
from qexp.train.memory import trim_heap


@torch.no_grad()
def evaluate(
    model: QuantModel,
    data: DataModule,
    split: str,
    batch_size: int,
    device: torch.device,
    mode: str = "auto",
    autocast: contextlib.AbstractContextManager | None = None,
    dist: DistInfo = SINGLE,
) -> float:
    """Accuracy on ``split`` with quantized layers in ``mode`` (auto = the hard grid in eval);
    each rank evaluates its slice of every batch and the counts are summed over the ranks."""
    trim_heap()  # freed training memory serves the evaluation batches (peak RSS)
    model.eval()
    correct = total = 0
    with quant_mode(model, mode), autocast or contextlib.nullcontext():
        for x, y in data.eval_batches(split, batch_size, device):
            x, y = eval_shard(x, y, dist)
            if y.numel():
                correct += int((model(x).argmax(dim=1) == y).sum())
                total += y.numel()
    model.train()
    correct, total = sum_over_ranks([correct, total], dist, device)
    return correct / total if total else float("nan")
