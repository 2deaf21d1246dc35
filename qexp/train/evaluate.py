"""Accuracy (and mean loss) of a quantized model on one split, with its quantized layers in a
chosen mode."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from qexp.data.base import DataModule
from qexp.estimators.model import QuantModel
from qexp.quant.layers import quant_mode
from qexp.train.distributed import SINGLE, DistInfo, eval_shard, sum_over_ranks
from qexp.train.memory import trim_heap


@dataclass(frozen=True)
class EvalResult:
    """Accuracy and mean cross-entropy (nats per target) over a split."""

    acc: float
    loss: float


@torch.no_grad()
def _evaluate(
    model: QuantModel,
    data: DataModule,
    split: str,
    batch_size: int,
    device: torch.device,
    mode: str,
    autocast: contextlib.AbstractContextManager | None,
    dist: DistInfo,
    with_loss: bool,
) -> EvalResult:
    trim_heap()  # freed training memory serves the evaluation batches (peak RSS)
    model.eval()
    correct = total = 0
    loss_sum = 0.0
    with quant_mode(model, mode), autocast or contextlib.nullcontext():
        for x, y in data.eval_batches(split, batch_size, device):
            x, y = eval_shard(x, y, dist)
            if y.numel():
                logits = model(x)
                correct += int((logits.argmax(dim=1) == y).sum())
                total += y.numel()
                if with_loss:
                    loss_sum += float(F.cross_entropy(logits.float(), y, reduction="sum"))
    model.train()
    correct, total, loss_sum = sum_over_ranks([correct, total, loss_sum], dist, device)
    if not total:
        return EvalResult(float("nan"), float("nan"))
    return EvalResult(correct / total, loss_sum / total if with_loss else float("nan"))


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
    return _evaluate(model, data, split, batch_size, device, mode, autocast, dist, False).acc


def evaluate_loss(
    model: QuantModel,
    data: DataModule,
    split: str,
    batch_size: int,
    device: torch.device,
    mode: str = "auto",
    autocast: contextlib.AbstractContextManager | None = None,
    dist: DistInfo = SINGLE,
) -> EvalResult:
    """Accuracy and mean cross-entropy (summed over all targets, divided by their number) on
    ``split``, in one pass; as :func:`evaluate` otherwise."""
    return _evaluate(model, data, split, batch_size, device, mode, autocast, dist, True)
