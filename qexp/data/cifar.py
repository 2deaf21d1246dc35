"""CIFAR-10 / CIFAR-100 via torchvision's loaders (whole arrays, no per-image transforms)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from qexp.data.augment import RandomCropFlip
from qexp.data.base import DataInfo, TensorDataModule, tensor_splits
from qexp.data.locate import (
    DATA_ENV,
    cache_data_dir,
    download_into,
    env_data_dir,
    one_line,
    unique,
)
from qexp.errors import QexpError


@dataclass(frozen=True)
class CifarSpec:
    name: str
    title: str
    tv_name: str  # torchvision class name
    folder: str  # torchvision's extracted folder, e.g. cifar-10-batches-py
    env_subdirs: tuple[str, ...]
    num_classes: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


def locate_cifar(spec: CifarSpec, root: str | None, download: bool) -> Path:
    """The folder holding `spec.folder` (what torchvision calls root), downloading if allowed.

    An explicit `root` is the only place searched (and the download target); otherwise
    $QEXP_DATA (and its subfolders), then the cache folder, then a download into the cache.
    """
    if root is not None and str(root).strip():
        candidates = [Path(root).expanduser()]
        target = candidates[0]
    else:
        candidates = []
        env = env_data_dir()
        if env is not None:
            candidates += [env, *(env / s for s in spec.env_subdirs)]
        target = cache_data_dir()
        candidates.append(target)
    for d in unique(candidates):
        if (d / spec.folder).is_dir():
            return d
    if download:
        import torchvision.datasets  # slow import, only needed here

        tv_cls = getattr(torchvision.datasets, spec.tv_name)
        download_into(spec.title, target, lambda: tv_cls(str(target), train=True, download=True))
        return target
    where = ", ".join(str(d / spec.folder) for d in unique(candidates))
    raise QexpError(
        f"{spec.title} not found (looked for {where}); set dataset.root=FOLDER (the folder "
        f"containing {spec.folder}), or put it in ${DATA_ENV}, or set dataset.download=true"
    )


def load_cifar(spec: CifarSpec, folder: Path) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
    """((train_x, train_y), (test_x, test_y)) with x uint8 (N, 3, 32, 32)."""
    import torchvision.datasets

    tv_cls = getattr(torchvision.datasets, spec.tv_name)
    out = []
    for train in (True, False):
        try:
            ds = tv_cls(str(folder), train=train, download=False)
        except RuntimeError as e:  # torchvision: "Dataset not found or corrupted"
            raise QexpError(
                f"{spec.title} files in {folder / spec.folder} are incomplete or corrupt "
                f"({one_line(e)}); delete that folder and download again"
            ) from e
        # HWC -> CHW once for the whole array; batches are then plain index_selects.
        x = torch.from_numpy(np.ascontiguousarray(ds.data.transpose(0, 3, 1, 2)))
        y = torch.as_tensor(ds.targets, dtype=torch.int64)
        out.append((x, y))
    return out[0], out[1]


class _Cifar(TensorDataModule):
    """Shared CIFAR builder.

    Args:
        root: folder containing cifar-10-batches-py / cifar-100-python; None searches
            $QEXP_DATA and the download cache.
        val_size: validation samples carved from the 50000 training images (count or fraction).
        split_seed: seed of that carve; fixed so every run shares one validation set.
        download: allow a torchvision download when the files are not found.
        augment: random crop (4-pixel zero padding) + horizontal flip on train batches.
        subset: use only the first N training samples after the split.
        name: data-set name reported in DataInfo.
    """

    spec: ClassVar[CifarSpec]

    def __init__(
        self,
        root: str | None = None,
        val_size: int | float = 5000,
        split_seed: int = 0,
        download: bool = True,
        augment: bool = True,
        subset: int | None = None,
        name: str | None = None,
    ) -> None:
        spec = self.spec
        folder = locate_cifar(spec, root, download)
        (x, y), test = load_cifar(spec, folder)
        train, val = tensor_splits(x, y, val_size, split_seed)
        info = DataInfo(
            name=name or spec.name, num_classes=spec.num_classes, in_channels=3, image_size=32
        )
        super().__init__(
            info,
            train,
            val,
            test,
            mean=spec.mean,
            std=spec.std,
            augment=RandomCropFlip(padding=4, flip=True) if augment else None,
            subset=subset,
        )


class CIFAR10(_Cifar):
    """CIFAR-10: 32x32 colour, 10 classes, 50000 train (before the val carve) / 10000 test."""

    spec = CifarSpec(
        name="cifar10",
        title="CIFAR-10",
        tv_name="CIFAR10",
        folder="cifar-10-batches-py",
        env_subdirs=("cifar10", "cifar-10"),
        num_classes=10,
        mean=(0.4914, 0.4822, 0.4465),
        std=(0.2470, 0.2435, 0.2616),
    )


class CIFAR100(_Cifar):
    """CIFAR-100: 32x32 colour, 100 fine classes, 50000 train (before the val carve) / 10000
    test."""

    spec = CifarSpec(
        name="cifar100",
        title="CIFAR-100",
        tv_name="CIFAR100",
        folder="cifar-100-python",
        env_subdirs=("cifar100", "cifar-100"),
        num_classes=100,
        mean=(0.5071, 0.4865, 0.4409),
        std=(0.2673, 0.2564, 0.2762),
    )
