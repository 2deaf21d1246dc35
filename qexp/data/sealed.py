"""A data module whose test split cannot be read: what tuning runs train on.

Tuning picks knobs on validation accuracy; a tuner that could see test accuracy would leak it
into the choice. Wrapping the data in :class:`SealedTest` makes every attempt to read the test
split an error, and tells the trainer (``test_sealed``) to end the run without a final test.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from qexp.data.base import Batch, DataModule
from qexp.errors import QexpError


class SealedSplitError(QexpError):
    """Something tried to read the test split of a sealed data module."""


class SealedTest(DataModule):
    """``inner`` with its test split sealed: train and val batches pass through unchanged."""

    test_sealed = True

    def __init__(self, inner: DataModule) -> None:
        self.inner = inner
        self.info = inner.info
        self.num_train, self.num_val, self.num_test = inner.num_train, inner.num_val, 0

    def train_batches(
        self, batch_size: int, epoch: int, seed: int, device: torch.device
    ) -> Iterator[Batch]:
        return self.inner.train_batches(batch_size, epoch, seed, device)

    def eval_batches(self, split: str, batch_size: int, device: torch.device) -> Iterator[Batch]:
        if split == "test":
            raise SealedSplitError("the test split is sealed while tuning; tune on 'val' only")
        return self.inner.eval_batches(split, batch_size, device)

    def data_report(self) -> dict[str, Any]:
        return self.inner.data_report()

    def steps_per_epoch(self, batch_size: int) -> int:
        return self.inner.steps_per_epoch(batch_size)
