"""scikit-learn's 8x8 handwritten digits: 1797 images, 10 classes, no download needed."""

from __future__ import annotations

import numpy as np
import torch

from qexp.data.base import DataInfo, TensorDataModule, split_indices, tensor_splits

# Mean/std of all 1797 images after scaling to [0, 1] (computed once; checked in tests).
DIGITS_MEAN = 0.3053
DIGITS_STD = 0.3759


def load_digits_uint8() -> tuple[torch.Tensor, torch.Tensor]:
    """All digits as uint8 (N, 1, 8, 8) images (0..16 scaled to 0..255) and int64 labels."""
    from sklearn.datasets import load_digits  # slow import, only needed here

    bunch = load_digits()
    images = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)
    x = torch.from_numpy(images).unsqueeze(1)
    y = torch.from_numpy(np.asarray(bunch.target, dtype=np.int64))
    return x, y


class Digits(TensorDataModule):
    """sklearn digits, split into train / val / test with a fixed seed.

    Args:
        val_size: validation part of what remains after the test carve (count or fraction < 1).
        test_size: test part of all 1797 images (count or fraction < 1).
        split_seed: seed of both carves; fixed so every run shares the same splits.
        subset: use only the first N training samples after the split.
        name: data-set name reported in DataInfo.
    """

    def __init__(
        self,
        val_size: int | float = 0.1,
        test_size: int | float = 0.2,
        split_seed: int = 0,
        subset: int | None = None,
        name: str | None = None,
    ) -> None:
        x, y = load_digits_uint8()
        keep, carved = split_indices(y.numel(), test_size, split_seed, "dataset.test_size")
        test = (x[carved], y[carved])
        # The val carve reuses split_seed on the remaining pool; the pools are disjoint anyway.
        train, val = tensor_splits(x[keep], y[keep], val_size, split_seed)
        info = DataInfo(name=name or "digits", num_classes=10, in_channels=1, image_size=8)
        super().__init__(
            info, train, val, test, mean=(DIGITS_MEAN,), std=(DIGITS_STD,), subset=subset
        )
