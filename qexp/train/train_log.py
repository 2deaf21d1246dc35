"""The trainer's running logs: loss/accuracy sums over a window of steps, the progress bar."""

from __future__ import annotations

import sys

import torch

from qexp.train.distributed import DistInfo, sum_over_ranks
from qexp.train.step import StepResult


class LossWindow:
    """Loss and correct-prediction sums of a span of steps, kept on the device (no host sync
    per step)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.reset()

    def reset(self) -> None:
        """Start an empty window."""
        self.loss = torch.zeros((), device=self.device)
        self.correct = torch.zeros((), device=self.device, dtype=torch.long)
        self.seen = 0

    def add(self, out: StepResult) -> None:
        """Add one step's batch."""
        self.loss += out.loss * out.samples
        self.correct += (out.logits.argmax(dim=1) == out.labels).sum()
        self.seen += out.samples

    def totals(self, dist: DistInfo) -> tuple[float, float, float]:
        """(loss sum, correct, samples) summed over the ranks."""
        loss, correct, seen = sum_over_ranks(
            [float(self.loss), float(self.correct), self.seen], dist, self.device
        )
        return loss, correct, seen


def bar_wanted(mode: str, dist: DistInfo) -> bool:
    """Whether ``trainer.progress=mode`` shows a progress bar on this rank."""
    return dist.is_main and (mode == "bar" or (mode == "auto" and sys.stderr.isatty()))


def progress_bar(mode: str, dist: DistInfo, steps: int, epoch: int, epochs: int):
    """A tqdm bar over one epoch's steps, or None where no bar is wanted."""
    if not bar_wanted(mode, dist):
        return None
    from tqdm import tqdm

    return tqdm(total=steps, desc=f"epoch {epoch + 1}/{epochs}", leave=False, dynamic_ncols=True)
