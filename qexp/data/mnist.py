"""MNIST, and the IDX-file machinery shared with Fashion-MNIST (same format and file names)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from qexp.data.base import DataInfo, TensorDataModule, tensor_splits
from qexp.data.idx import read_idx_images, read_idx_labels
from qexp.data.locate import DATA_ENV, cache_data_dir, download_into, env_data_dir, unique
from qexp.errors import QexpError

# Split -> accepted file stems (the original MNIST site also used "train-images.idx3-ubyte").
IDX_FILES: dict[str, tuple[str, ...]] = {
    "train_images": ("train-images-idx3-ubyte", "train-images.idx3-ubyte"),
    "train_labels": ("train-labels-idx1-ubyte", "train-labels.idx1-ubyte"),
    "test_images": ("t10k-images-idx3-ubyte", "t10k-images.idx3-ubyte"),
    "test_labels": ("t10k-labels-idx1-ubyte", "t10k-labels.idx1-ubyte"),
}


@dataclass(frozen=True)
class IdxSpec:
    """What differs between the MNIST-like data sets."""

    name: str  # DataInfo.name
    title: str  # for messages
    tv_name: str  # torchvision class; its files live in <dir>/<tv_name>/raw
    env_subdirs: tuple[str, ...]  # folders under $QEXP_DATA to look in
    mean: float
    std: float
    num_classes: int = 10
    install_hint: str = ""  # e.g. how to get it from the OS package manager


def find_idx_files(folder: Path) -> dict[str, Path] | None:
    """The four IDX files in `folder` (each plain or .gz), or None unless all are there."""
    found: dict[str, Path] = {}
    for key, stems in IDX_FILES.items():
        for stem in stems:
            hits = [folder / (stem + s) for s in ("", ".gz") if (folder / (stem + s)).is_file()]
            if hits:
                found[key] = hits[0]
                break
        else:
            return None
    return found


def _layouts(folder: Path, spec: IdxSpec) -> list[Path]:
    """A folder itself plus torchvision's <folder>/<Name>/raw layout."""
    return [folder, folder / spec.tv_name / "raw"]


def locate_idx_files(
    spec: IdxSpec,
    root: str | Path | None,
    system_dirs: list[Path],
    download: bool,
) -> dict[str, Path]:
    """Find (or download) the IDX files of an MNIST-like data set.

    Search order: `root` if given (and only there: an explicit root that lacks the files is an
    error, or the download target when `download`), else $QEXP_DATA (and its `env_subdirs`,
    <Name>/raw), `system_dirs`, the cache folder, and finally a torchvision download into the
    cache folder when `download` is true.
    """
    if root is not None and str(root).strip():
        root = Path(root).expanduser()
        for d in _layouts(root, spec):
            if (files := find_idx_files(d)) is not None:
                return files
        if download:
            return _download(spec, root)
        raise QexpError(
            f"no {spec.title} files (train-images-idx3-ubyte[.gz] etc.) in dataset.root={root} "
            f"or {root / spec.tv_name / 'raw'}; fix dataset.root, or set dataset.root=null to "
            f"search ${DATA_ENV} and the defaults, or set dataset.download=true"
        )

    candidates: list[Path] = []
    env = env_data_dir()
    if env is not None:
        candidates += [env, *(env / s for s in spec.env_subdirs), env / spec.tv_name / "raw"]
    candidates += system_dirs
    cache = cache_data_dir()
    candidates += _layouts(cache, spec)
    for d in unique(candidates):
        if (files := find_idx_files(d)) is not None:
            return files
    if download:
        return _download(spec, cache)
    hint = f", {spec.install_hint}" if spec.install_hint else ""
    raise QexpError(
        f"{spec.title} not found (looked in {', '.join(map(str, unique(candidates)))}); "
        f"set dataset.root=FOLDER, or put the files in ${DATA_ENV} "
        f"(or ${DATA_ENV}/{spec.env_subdirs[0]}){hint}, "
        f"or set dataset.download=true to download it into {cache}"
    )


def _download(spec: IdxSpec, target: Path) -> dict[str, Path]:
    """Download with torchvision into target/<Name>/raw and return the files found there."""

    def fetch() -> None:
        import torchvision.datasets  # slow import, only needed here

        getattr(torchvision.datasets, spec.tv_name)(str(target), train=True, download=True)

    download_into(spec.title, target, fetch, spec.install_hint)
    files = find_idx_files(target / spec.tv_name / "raw")
    if files is None:
        raise QexpError(
            f"{spec.title} download into {target} left no IDX files; delete "
            f"{target / spec.tv_name} and try again"
        )
    return files


def load_idx_splits(
    spec: IdxSpec, files: dict[str, Path]
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """Read the four files into ((train_x, train_y), (test_x, test_y)), x uint8 (N, 1, H, W)."""
    out = []
    for split in ("train", "test"):
        img_path, lab_path = files[f"{split}_images"], files[f"{split}_labels"]
        images = read_idx_images(img_path)
        labels = read_idx_labels(lab_path)
        if images.shape[0] != labels.shape[0]:
            raise QexpError(
                f"{img_path} holds {images.shape[0]} images but {lab_path} holds "
                f"{labels.shape[0]} labels; the files do not belong together, fetch them again"
            )
        if labels.size and int(labels.max()) >= spec.num_classes:
            raise QexpError(
                f"{lab_path} has label {int(labels.max())}, but {spec.title} has "
                f"{spec.num_classes} classes; is it the right data set?"
            )
        x = torch.from_numpy(images).unsqueeze(1)  # (N, 1, H, W)
        y = torch.from_numpy(labels).to(torch.int64)
        out.append((x, y))
    h, w = out[0][0].shape[2:]
    if h != w or out[1][0].shape[2:] != (h, w):
        raise QexpError(f"{spec.title} images must be square and the same size in both splits")
    return out[0], out[1]


class MnistLike(TensorDataModule):
    """Shared builder for IDX data sets; subclasses set `spec` and maybe `system_dirs`.

    Args:
        root: folder with the IDX files (plain or .gz, or torchvision's <Name>/raw layout);
            None searches $QEXP_DATA, system folders and the download cache.
        val_size: validation samples carved from the training set (count, or fraction < 1).
        split_seed: seed of that carve; fixed so every run shares one validation set.
        download: allow a torchvision download when the files are not found.
        subset: use only the first N training samples after the split.
        name: data-set name reported in DataInfo (defaults to the spec's).
    """

    spec: ClassVar[IdxSpec]

    def system_dirs(self) -> list[Path]:
        """OS-provided folders to search after $QEXP_DATA (none by default)."""
        return []

    def __init__(
        self,
        root: str | None = None,
        val_size: int | float = 5000,
        split_seed: int = 0,
        download: bool = True,
        subset: int | None = None,
        name: str | None = None,
    ) -> None:
        files = locate_idx_files(self.spec, root, self.system_dirs(), download)
        self.files = files
        (x, y), test = load_idx_splits(self.spec, files)
        train, val = tensor_splits(x, y, val_size, split_seed)
        info = DataInfo(
            name=name or self.spec.name,
            num_classes=self.spec.num_classes,
            in_channels=1,
            image_size=int(x.shape[-1]),
        )
        super().__init__(
            info, train, val, test, mean=(self.spec.mean,), std=(self.spec.std,), subset=subset
        )


MNIST_SPEC = IdxSpec(
    name="mnist",
    title="MNIST",
    tv_name="MNIST",
    env_subdirs=("mnist",),
    mean=0.1307,
    std=0.3081,
)


class MNIST(MnistLike):
    """MNIST handwritten digits: 28x28 grey, 10 classes, 60000 train (before the val carve) and
    10000 test images. See `MnistLike` for the options."""

    spec = MNIST_SPEC
