"""ImageNet-style folders (root/train/<class>/*.jpg, root/val/<class>/*.jpg) streamed from disk."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from qexp.data.bad_images import (
    BadImageRule,
    BadImages,
    Unreadable,
    collate_readable,
    load_or_flag,
    scan,
)
from qexp.data.base import (
    Batch,
    DataInfo,
    DataModule,
    check_batch_size,
    check_split,
    check_subset,
    epoch_seed,
    split_indices,
)
from qexp.data.locate import one_line
from qexp.errors import QexpError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_GOLDEN = 0x9E3779B97F4A7C15  # spreads per-sample seeds apart


class _View(Dataset):
    """`indices` of an ImageFolder's samples under one transform.

    With a `seed`, sample k's random transform is drawn from torch's RNG seeded with
    (seed, k) inside fork_rng: augmentation is then reproducible whatever the worker count,
    and the caller's global RNG is left untouched.
    """

    def __init__(
        self,
        samples: list[tuple[str, int]],
        loader: Callable[[str], Any],
        indices: list[int],
        transform: Callable[[Any], torch.Tensor],
        seed: int | None,
    ) -> None:
        self.samples = samples
        self.loader = loader
        self.indices = indices
        self.transform = transform
        self.seed = seed

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int) -> tuple[torch.Tensor, int]:
        path, target = self.samples[self.indices[k]]
        image = load_or_flag(self.loader, path)
        if isinstance(image, Unreadable):
            return image  # the main process applies dataset.bad_images (qexp/data/bad_images.py)
        if self.seed is None:
            return self.transform(image), target
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((self.seed ^ (k * _GOLDEN)) & 0x7FFFFFFFFFFFFFFF)
            return self.transform(image), target


class ImageFolderData(DataModule):
    """ImageNet layout: root/train/<class>/* for training (validation carved from it) and
    root/val/<class>/* as the test set.

    Args:
        root: data set folder holding train/ and val/.
        image_size: side of the square crops the model sees.
        val_size: validation images carved from train/ (count or fraction < 1).
        split_seed: seed of that carve; fixed so every run shares one validation set.
        workers: DataLoader worker processes (0 loads in the main process).
        subset: use only the first N training images after the split.
        name: data-set name reported in DataInfo (default "imagefolder").
        bad_images: what to do with files PIL cannot read: "error" (stop, naming the file) or
            "skip" (leave them out, logged and counted in metrics.json).
        scan_images: check every file the run uses before training (PIL verify, no decoding);
            False finds unreadable files only when they are loaded.
    """

    def __init__(
        self,
        root: str,
        image_size: int = 224,
        val_size: int | float = 10000,
        split_seed: int = 0,
        workers: int = 4,
        subset: int | None = None,
        name: str | None = None,
        bad_images: BadImageRule = "error",
        scan_images: bool = True,
    ) -> None:
        from torchvision import datasets, transforms  # slow import, only needed here

        check_subset(subset)
        self.bad = BadImages(bad_images)
        if root is None or not str(root).strip():
            raise QexpError("dataset.root is required: set dataset.root=FOLDER (with train/, val/)")
        root_path = Path(root).expanduser()
        layout = f"expected {root_path}/train/<class>/*.jpg and {root_path}/val/<class>/*.jpg"
        for sub in ("train", "val"):
            if not (root_path / sub).is_dir():
                raise QexpError(f"no folder {root_path / sub}; {layout}; fix dataset.root")
        try:
            train_ds = datasets.ImageFolder(str(root_path / "train"))
            test_ds = datasets.ImageFolder(str(root_path / "val"))
        except (FileNotFoundError, OSError) as e:
            raise QexpError(
                f"cannot read image folders under {root_path} ({one_line(e)}); {layout}"
            ) from e
        if test_ds.classes != train_ds.classes:
            raise QexpError(
                f"{root_path}/val has classes that differ from {root_path}/train; both need the "
                "same <class> folders"
            )
        keep, carved = split_indices(len(train_ds), val_size, split_seed, "dataset.val_size")
        if subset is not None:
            keep = keep[:subset]
        self._train_samples = train_ds.samples
        self._test_samples = test_ds.samples
        self._loader = train_ds.loader
        self.workers = int(workers)
        self.root = root_path
        self._train_idx = keep.tolist()
        self._val_idx = carved.tolist()
        self._test_idx = list(range(len(self._test_samples)))
        if scan_images:
            self._leave_out_unreadable()
        if not self._train_idx:
            raise QexpError(f"no readable training images under {root_path}/train")

        normalize = transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)
        self.train_transform = transforms.Compose(
            [
                transforms.RandomResizedCrop(image_size),
                transforms.RandomHorizontalFlip(),
                transforms.ToTensor(),
                normalize,
            ]
        )
        self.eval_transform = transforms.Compose(
            [
                transforms.Resize(round(image_size * 256 / 224)),  # the usual 256 -> 224 ratio
                transforms.CenterCrop(image_size),
                transforms.ToTensor(),
                normalize,
            ]
        )
        self.info = DataInfo(
            name=name or "imagefolder",
            num_classes=len(train_ds.classes),
            in_channels=3,
            image_size=image_size,
        )
        self.classes = list(train_ds.classes)
        self.num_train = len(self._train_idx)
        self.num_val = len(self._val_idx)
        self.num_test = len(self._test_idx)

    def _leave_out_unreadable(self) -> None:
        """Scan the files this run uses; apply dataset.bad_images to the unreadable ones."""
        parts = [
            (self._train_samples, self._train_idx),
            (self._train_samples, self._val_idx),
            (self._test_samples, self._test_idx),
        ]
        paths = [samples[i][0] for samples, idx in parts for i in idx]
        drop = self.bad.after_scan(scan(paths, threads=min(32, 4 * max(1, self.workers))))
        if drop:
            self._train_idx, self._val_idx, self._test_idx = (
                [i for i in idx if samples[i][0] not in drop] for samples, idx in parts
            )

    def data_report(self) -> dict[str, Any]:
        """Unreadable images left out so far (dataset.bad_images=skip), for metrics.json."""
        return {"bad_images": self.bad.report()}

    def _batches(
        self, view: _View, batch_size: int, device: torch.device, loader_seed: int
    ) -> Iterator[Batch]:
        device = torch.device(device)
        loader = DataLoader(
            view,
            batch_size=batch_size,
            shuffle=False,  # the order is already in `view`
            num_workers=self.workers,
            pin_memory=device.type == "cuda",
            # DataLoader draws a worker base seed even with 0 workers; give it its own generator
            # so the global RNG (dropout, init) is not advanced by data loading.
            generator=torch.Generator().manual_seed(loader_seed),
            collate_fn=collate_readable,
        )
        for x, y, unreadable in loader:
            self.bad.after_load(unreadable)
            if x is None:
                continue  # every image of this batch was left out
            yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)

    def train_batches(
        self, batch_size: int, epoch: int, seed: int, device: torch.device
    ) -> Iterator[Batch]:
        check_batch_size(batch_size)
        s = epoch_seed(seed, epoch)
        g = torch.Generator().manual_seed(s)
        order = torch.randperm(self.num_train, generator=g).tolist()
        indices = [self._train_idx[i] for i in order]
        view = _View(self._train_samples, self._loader, indices, self.train_transform, seed=s)
        return self._batches(view, batch_size, device, s)

    def eval_batches(self, split: str, batch_size: int, device: torch.device) -> Iterator[Batch]:
        check_split(split)
        check_batch_size(batch_size)
        if split == "val":
            view = _View(
                self._train_samples, self._loader, self._val_idx, self.eval_transform, None
            )
        else:
            view = _View(
                self._test_samples, self._loader, self._test_idx, self.eval_transform, None
            )
        return self._batches(view, batch_size, device, 0)

    def __repr__(self) -> str:
        return (
            f"ImageFolderData({self.root}: train={self.num_train}, val={self.num_val}, "
            f"test={self.num_test}, classes={self.info.num_classes})"
        )
