"""Data-set interface used by the trainer, and an in-memory implementation for small data sets."""

from __future__ import annotations

import abc
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from qexp.errors import QexpError

Batch = tuple[Tensor, Tensor]
# Batch augmentation: (uint8 or float batch (B, C, H, W), CPU generator) -> batch of same shape.
Augment = Callable[[Tensor, torch.Generator], Tensor]


@dataclass(frozen=True)
class DataInfo:
    """What a model needs to know about a data set."""

    name: str  # "fashion_mnist", ...
    num_classes: int  # classes; for text: the vocabulary size
    in_channels: int  # image channels; for text: 1
    image_size: int  # height == width of the batches the model sees; for text: the block size
    #: "image": float batches (B, C, H, W); "tokens": int64 token ids (B, image_size)
    input_kind: str = "image"

    def example_input(self, device: torch.device | str = "cpu") -> Tensor:
        """A zero input of one sample, shaped and typed as the model's batches are (for shape
        probes such as the cost report and the precision monitor)."""
        if self.input_kind == "tokens":
            return torch.zeros(1, self.image_size, dtype=torch.long, device=device)
        size = self.image_size
        return torch.zeros(1, self.in_channels, size, size, device=device)


class DataModule(abc.ABC):
    """A data set split into train / val / test, handing out normalized batches on a device."""

    info: DataInfo
    num_train: int
    num_val: int
    num_test: int
    #: True while tuning (qexp.data.sealed.SealedTest): the test split must not be read
    test_sealed: bool = False

    @abc.abstractmethod
    def train_batches(
        self, batch_size: int, epoch: int, seed: int, device: torch.device
    ) -> Iterator[Batch]:
        """Shuffled (and augmented where the data set has augmentation) batches of `epoch`.

        Fully deterministic given (seed, epoch): uses its own generator seeded from both, never
        the global RNG, so a resumed run sees exactly the same batches. Drops nothing (the last
        batch may be smaller).
        """

    @abc.abstractmethod
    def eval_batches(self, split: str, batch_size: int, device: torch.device) -> Iterator[Batch]:
        """Batches of split "val" or "test" in a fixed order, without augmentation."""

    def data_report(self) -> dict[str, Any]:
        """Facts about the data a run's metrics.json records (e.g. images left out); none here."""
        return {}

    def steps_per_epoch(self, batch_size: int) -> int:
        """Number of train batches per epoch (the last one may be partial)."""
        check_batch_size(batch_size)
        return math.ceil(self.num_train / batch_size)


# --------------------------------------------------------------------------------------------
# Helpers shared by the builders.


def check_batch_size(batch_size: int) -> None:
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise QexpError(f"batch size must be a positive integer, got {batch_size!r}")


def check_split(split: str) -> None:
    if split not in ("val", "test"):
        raise QexpError(f"unknown evaluation split {split!r}; use 'val' or 'test'")


def epoch_seed(seed: int, epoch: int) -> int:
    """A 63-bit seed mixing the run seed and the epoch (SeedSequence avoids seed+epoch overlaps:
    run 1 epoch 0 must not see the same order as run 0 epoch 1)."""
    words = [int(seed) & 0xFFFFFFFFFFFFFFFF, int(epoch) & 0xFFFFFFFFFFFFFFFF]
    state = np.random.SeedSequence(words).generate_state(1, dtype=np.uint64)[0]
    return int(state) & 0x7FFFFFFFFFFFFFFF


def resolve_size(size: int | float, n: int, option: str) -> int:
    """Turn a count (int) or fraction (float < 1) of `n` into a count, checking the range."""
    if isinstance(size, bool) or not isinstance(size, (int, float)):
        raise QexpError(f"{option} must be a count or a fraction below 1, got {size!r}")
    if isinstance(size, float):
        if 0.0 <= size < 1.0:
            count = round(size * n)
        elif size.is_integer():  # 5000.0 from a YAML/CLI override means a count
            count = int(size)
        else:
            raise QexpError(f"{option}={size} is neither a fraction below 1 nor a whole count")
    else:
        count = size
    if count < 0 or count >= n:
        raise QexpError(
            f"{option}={size} must leave some of the {n} samples for training; "
            f"choose a count in [0, {n - 1}] or a fraction below 1"
        )
    return count


def split_indices(n: int, size: int | float, seed: int, option: str) -> tuple[Tensor, Tensor]:
    """Randomly carve `size` (count or fraction) of range(n) out, with a fixed seed.

    Returns (kept, carved) int64 index tensors. The seed is independent of the run seed, so
    every run shares the same split. Both parts are in shuffled order, which makes a `subset`
    (the first N kept samples) a random, roughly class-balanced sample.
    """
    count = resolve_size(size, n, option)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))
    return perm[count:], perm[:count]


def check_subset(subset: int | None, option: str = "dataset.subset") -> None:
    if subset is not None and (
        isinstance(subset, bool) or not isinstance(subset, int) or subset < 1
    ):
        raise QexpError(f"{option} must be null or a positive integer, got {subset!r}")


def normalize_device(device: torch.device | str) -> torch.device:
    """Canonical device, so "cuda" and "cuda:0" share one cached copy of the data."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


# --------------------------------------------------------------------------------------------


class TensorDataModule(DataModule):
    """A data set held in memory as uint8 (N, C, H, W) images and int64 labels.

    The tensors are moved to each device once and cached; batches are drawn by index and
    normalized on the device, so there is no per-image Python work.

    Args:
        info: data set description.
        train, val, test: (images uint8 (N, C, H, W), labels int64 (N,)) per split; val may
            hold zero samples.
        mean, std: per-channel normalization constants (for values scaled to [0, 1]).
        augment: optional batch augmentation applied to train batches before normalization,
            called as augment(x_uint8, cpu_generator).
        subset: keep only the first `subset` training samples (smoke runs).
    """

    def __init__(
        self,
        info: DataInfo,
        train: tuple[Tensor, Tensor],
        val: tuple[Tensor, Tensor],
        test: tuple[Tensor, Tensor],
        mean: Sequence[float],
        std: Sequence[float],
        augment: Augment | None = None,
        subset: int | None = None,
    ) -> None:
        check_subset(subset)
        if len(mean) != info.in_channels or len(std) != info.in_channels:
            raise ValueError("mean/std need one value per channel")
        splits = {"train": train, "val": val, "test": test}
        for split, (x, y) in splits.items():
            if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[1] != info.in_channels:
                raise ValueError(f"{split} images must be uint8 (N, {info.in_channels}, H, W)")
            if y.dtype != torch.int64 or y.shape != (x.shape[0],):
                raise ValueError(f"{split} labels must be int64 with one per image")
        if subset is not None:
            splits["train"] = (train[0][:subset], train[1][:subset])
        self.info = info
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.augment = augment
        self._cpu = {k: (x.contiguous(), y.contiguous()) for k, (x, y) in splits.items()}
        self._cache: dict[torch.device, dict[str, tuple[Tensor, Tensor]]] = {}
        self._norm: dict[torch.device, tuple[Tensor, Tensor]] = {}
        self.num_train = int(self._cpu["train"][1].numel())
        self.num_val = int(self._cpu["val"][1].numel())
        self.num_test = int(self._cpu["test"][1].numel())
        if self.num_train == 0:
            raise QexpError(f"{info.name}: the training split is empty; lower dataset.val_size")

    def _on(self, device: torch.device | str) -> dict[str, tuple[Tensor, Tensor]]:
        """The splits on `device`, copied there on first use."""
        device = normalize_device(device)
        if device not in self._cache:
            if device.type == "cpu":
                self._cache[device] = self._cpu
            else:
                self._cache[device] = {
                    k: (x.to(device), y.to(device)) for k, (x, y) in self._cpu.items()
                }
            # x_norm = (x/255 - mean)/std = x * scale - shift, one fused multiply and subtract.
            mean = torch.tensor(self.mean, dtype=torch.float32).view(1, -1, 1, 1)
            std = torch.tensor(self.std, dtype=torch.float32).view(1, -1, 1, 1)
            self._norm[device] = ((1.0 / (255.0 * std)).to(device), (mean / std).to(device))
        return self._cache[device]

    def normalize(self, x: Tensor) -> Tensor:
        """uint8 (or 0..255 float) batch on a cached device -> normalized float32 batch."""
        scale, shift = self._norm[normalize_device(x.device)]
        return x.to(torch.float32).mul_(scale).sub_(shift)

    def train_batches(
        self, batch_size: int, epoch: int, seed: int, device: torch.device
    ) -> Iterator[Batch]:
        check_batch_size(batch_size)
        return self._train_iter(batch_size, epoch, seed, device)

    def _train_iter(
        self, batch_size: int, epoch: int, seed: int, device: torch.device
    ) -> Iterator[Batch]:
        x_all, y_all = self._on(device)["train"]
        # One CPU generator per (seed, epoch) for both the order and the augmentation, so the
        # batches do not depend on the device or on anything else drawing random numbers.
        g = torch.Generator().manual_seed(epoch_seed(seed, epoch))
        perm = torch.randperm(self.num_train, generator=g).to(x_all.device)
        for start in range(0, self.num_train, batch_size):
            idx = perm[start : start + batch_size]
            x = x_all.index_select(0, idx)
            if self.augment is not None:
                x = self.augment(x, g)
            yield self.normalize(x), y_all.index_select(0, idx)

    def eval_batches(self, split: str, batch_size: int, device: torch.device) -> Iterator[Batch]:
        check_split(split)
        check_batch_size(batch_size)
        return self._eval_iter(split, batch_size, device)

    def _eval_iter(self, split: str, batch_size: int, device: torch.device) -> Iterator[Batch]:
        x_all, y_all = self._on(device)[split]
        for start in range(0, x_all.shape[0], batch_size):
            yield (
                self.normalize(x_all[start : start + batch_size]),
                y_all[start : start + batch_size],
            )

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.info.name}: train={self.num_train}, "
            f"val={self.num_val}, test={self.num_test})"
        )


def tensor_splits(
    images: Tensor,
    labels: Tensor,
    val_size: int | float,
    split_seed: int,
) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """Carve a validation split out of a training set: returns ((x, y) train, (x, y) val)."""
    keep, carved = split_indices(labels.numel(), val_size, split_seed, "dataset.val_size")
    return (
        (images.index_select(0, keep), labels.index_select(0, keep)),
        (images.index_select(0, carved), labels.index_select(0, carved)),
    )
