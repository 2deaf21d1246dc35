"""Tests for qexp.data: IDX reader, data-set location, batching, splits, augmentation.

Nothing here downloads: QEXP_CACHE points at a temporary folder and download=False wherever a
data set could be missing.
"""

from __future__ import annotations

import gzip
import importlib
import inspect
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

import qexp.data.fashion_mnist as fm
from qexp.data import DataInfo, DataModule, TensorDataModule
from qexp.data.augment import RandomCropFlip
from qexp.data.base import epoch_seed, resolve_size
from qexp.data.idx import read_idx, read_idx_images, read_idx_labels, write_idx
from qexp.errors import QexpError

CPU = torch.device("cpu")
CONF_DIR = Path(__file__).resolve().parents[1] / "conf" / "dataset"
REAL_FMNIST = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No user QEXP_DATA, and a private empty cache: tests never see or fill ~/.cache."""
    monkeypatch.delenv("QEXP_DATA", raising=False)
    monkeypatch.setenv("QEXP_CACHE", str(tmp_path / "cache"))


def write_fake_mnist(
    folder: Path, n_train: int = 20, n_test: int = 10, gz: bool = True, seed: int = 0
) -> None:
    """Four tiny IDX files in MNIST naming (28x28, labels i % 10)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    ext = ".gz" if gz else ""
    for split, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        write_idx(folder / f"{split}-images-idx3-ubyte{ext}", images)
        write_idx(folder / f"{split}-labels-idx1-ubyte{ext}", labels)


def fake_module(
    n: int = 103, channels: int = 1, size: int = 4, augment=None, val: int = 0
) -> TensorDataModule:
    """A TensorDataModule whose labels are sample ids, so batches can be traced back."""
    g = torch.Generator().manual_seed(123)
    x = torch.randint(0, 256, (n, channels, size, size), dtype=torch.uint8, generator=g)
    y = torch.arange(n, dtype=torch.int64)
    info = DataInfo(name="fake", num_classes=n, in_channels=channels, image_size=size)
    empty = (x[:0], y[:0])
    return TensorDataModule(
        info,
        train=(x, y),
        val=(x[:val], y[:val]) if val else empty,
        test=(x[:7], y[:7]),
        mean=[0.5] * channels,
        std=[0.25] * channels,
        augment=augment,
    )


# ------------------------------------------------------------------------------------- IDX


@pytest.mark.parametrize("gz", [False, True])
def test_idx_roundtrip(tmp_path: Path, gz: bool) -> None:
    ext = ".gz" if gz else ""
    images = np.arange(3 * 5 * 4, dtype=np.uint8).reshape(3, 5, 4)
    labels = np.array([7, 0, 9], dtype=np.uint8)
    write_idx(tmp_path / f"img{ext}", images)
    write_idx(tmp_path / f"lab{ext}", labels)
    assert (tmp_path / f"img{ext}").read_bytes()[:2] == (b"\x1f\x8b" if gz else b"\x00\x00")
    got_images = read_idx_images(tmp_path / f"img{ext}")
    got_labels = read_idx_labels(tmp_path / f"lab{ext}")
    np.testing.assert_array_equal(got_images, images)
    np.testing.assert_array_equal(got_labels, labels)
    assert got_images.dtype == np.uint8 and got_images.flags.writeable
    # Swapped files: labels are 0x0801, images 0x0803.
    with pytest.raises(QexpError, match="0x0801"):
        read_idx_images(tmp_path / f"lab{ext}")


def test_idx_other_dtype(tmp_path: Path) -> None:
    arr = np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4)
    write_idx(tmp_path / "f.idx", arr)
    np.testing.assert_array_equal(read_idx(tmp_path / "f.idx"), arr)


@pytest.mark.parametrize("gz", [False, True])
def test_idx_truncated_raises(tmp_path: Path, gz: bool) -> None:
    path = tmp_path / ("img.gz" if gz else "img")
    write_idx(path, np.zeros((10, 28, 28), dtype=np.uint8))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(QexpError) as err:
        read_idx_images(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_idx_not_idx(tmp_path: Path) -> None:
    path = tmp_path / "junk"
    path.write_bytes(b"hello world, not an idx file")
    with pytest.raises(QexpError, match="not an IDX file"):
        read_idx(path)
    bad_gz = tmp_path / "junk.gz"
    bad_gz.write_bytes(b"\x1f\x8b" + b"\x00" * 30)
    with pytest.raises(QexpError, match="junk.gz"):
        read_idx(bad_gz)


# ---------------------------------------------------------------------------- Fashion-MNIST


@pytest.fixture(scope="module")
def real_fmnist() -> fm.FashionMNIST:
    if not (REAL_FMNIST / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"real Fashion-MNIST not installed at {REAL_FMNIST} (dataset-fashion-mnist)")
    return fm.FashionMNIST(root=str(REAL_FMNIST), download=False)


def test_fashion_mnist_real(real_fmnist: fm.FashionMNIST) -> None:
    dm = real_fmnist
    assert isinstance(dm, DataModule)
    assert (dm.num_train, dm.num_val, dm.num_test) == (55000, 5000, 10000)
    assert dm.info == DataInfo("fashion_mnist", num_classes=10, in_channels=1, image_size=28)
    assert dm.steps_per_epoch(1000) == 55
    x, y = next(iter(dm.train_batches(512, epoch=0, seed=0, device=CPU)))
    assert x.shape == (512, 1, 28, 28) and x.dtype == torch.float32
    assert y.shape == (512,) and y.dtype == torch.int64
    assert int(y.min()) >= 0 and int(y.max()) <= 9
    # Normalized with the data set's own mean/std: roughly zero mean, unit variance.
    assert abs(float(x.mean())) < 0.1 and abs(float(x.std()) - 1) < 0.1
    counts = {}
    for split in ("val", "test"):
        ys = [yb for _, yb in dm.eval_batches(split, 4096, CPU)]
        counts[split] = sum(len(yb) for yb in ys)
        assert set(torch.cat(ys).tolist()) == set(range(10))
    assert counts == {"val": 5000, "test": 10000}


def test_fashion_mnist_root_wins_over_debian(tmp_path: Path) -> None:
    write_fake_mnist(tmp_path / "mine", n_train=20, n_test=10)
    dm = fm.FashionMNIST(root=str(tmp_path / "mine"), val_size=5, download=False)
    assert (dm.num_train, dm.num_val, dm.num_test) == (15, 5, 10)
    assert dm.files["train_images"].parent == tmp_path / "mine"


def test_fashion_mnist_torchvision_layout_uncompressed(tmp_path: Path) -> None:
    write_fake_mnist(tmp_path / "FashionMNIST" / "raw", n_train=12, n_test=4, gz=False)
    dm = fm.FashionMNIST(root=str(tmp_path), val_size=0.25, download=False)
    assert (dm.num_train, dm.num_val, dm.num_test) == (9, 3, 4)


def test_fashion_mnist_qexp_data_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # QEXP_DATA comes before the Debian folder (which may well exist on this machine).
    write_fake_mnist(tmp_path / "fashion-mnist", n_train=30, n_test=6)
    monkeypatch.setenv("QEXP_DATA", str(tmp_path))
    dm = fm.FashionMNIST(val_size=10, download=False)
    assert (dm.num_train, dm.num_val, dm.num_test) == (20, 10, 6)


def test_fashion_mnist_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fm, "DEBIAN_DIR", tmp_path / "no-such-dir")
    monkeypatch.setenv("QEXP_DATA", str(tmp_path / "empty"))
    with pytest.raises(QexpError) as err:
        fm.FashionMNIST(download=False)
    msg = str(err.value)
    assert "QEXP_DATA" in msg and "dataset.root" in msg and "apt-get install" in msg
    assert "download" in msg and "\n" not in msg
    # An explicit root that lacks the files is an error too (no silent fallback).
    with pytest.raises(QexpError, match="dataset.root"):
        fm.FashionMNIST(root=str(tmp_path / "empty"), download=False)


def test_fashion_mnist_mismatched_files(tmp_path: Path) -> None:
    write_fake_mnist(tmp_path, n_train=20, n_test=10)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.zeros(19, dtype=np.uint8))
    with pytest.raises(QexpError, match="19 labels"):
        fm.FashionMNIST(root=str(tmp_path), val_size=0, download=False)


def test_mnist_shares_the_search(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from qexp.data.mnist import MNIST

    write_fake_mnist(tmp_path / "MNIST" / "raw", n_train=10, n_test=5)
    monkeypatch.setenv("QEXP_DATA", str(tmp_path))
    dm = MNIST(val_size=0, download=False, subset=4)
    assert dm.info.name == "mnist" and (dm.num_train, dm.num_val, dm.num_test) == (4, 0, 5)
    monkeypatch.setenv("QEXP_DATA", str(tmp_path / "nothing"))
    with pytest.raises(QexpError, match="QEXP_DATA"):
        MNIST(download=False)


# --------------------------------------------------------------------------------- batching


def _ids(dm: DataModule, batch_size: int, epoch: int, seed: int) -> list[list[int]]:
    return [y.tolist() for _, y in dm.train_batches(batch_size, epoch, seed, CPU)]


def test_train_batches_deterministic_and_complete() -> None:
    dm = fake_module(n=103)
    rng_state = torch.get_rng_state()
    a = _ids(dm, 10, epoch=3, seed=7)
    assert torch.equal(torch.get_rng_state(), rng_state)  # the global RNG is not used
    assert a == _ids(dm, 10, epoch=3, seed=7)
    assert a != _ids(dm, 10, epoch=4, seed=7)
    assert a != _ids(dm, 10, epoch=3, seed=8)
    # Every sample exactly once, nothing dropped, last batch partial.
    assert sorted(sum(a, [])) == list(range(103))
    assert [len(b) for b in a] == [10] * 10 + [3] and dm.steps_per_epoch(10) == 11
    # Same batches, same pixels.
    x1 = [x for x, _ in dm.train_batches(10, 3, 7, CPU)]
    x2 = [x for x, _ in dm.train_batches(10, 3, 7, CPU)]
    assert all(torch.equal(p, q) for p, q in zip(x1, x2, strict=True))
    assert epoch_seed(0, 1) != epoch_seed(1, 0)


def test_normalization_and_eval_order() -> None:
    dm = fake_module(n=20, val=6)
    x_raw = dm._cpu["test"][0]
    xs, ys = zip(*dm.eval_batches("test", 3, CPU), strict=True)
    assert torch.equal(torch.cat(ys), torch.arange(7))
    expected = (x_raw.float() / 255 - 0.5) / 0.25
    torch.testing.assert_close(torch.cat(xs), expected)
    assert sum(len(y) for _, y in dm.eval_batches("val", 4, CPU)) == 6
    with pytest.raises(QexpError, match="val"):
        dm.eval_batches("train", 4, CPU)
    with pytest.raises(QexpError, match="batch size"):
        dm.train_batches(0, 0, 0, CPU)


def test_val_size_zero_and_sizes() -> None:
    dm = fake_module(n=20, val=0)
    assert dm.num_val == 0 and list(dm.eval_batches("val", 8, CPU)) == []
    assert resolve_size(0.25, 100, "v") == 25
    assert resolve_size(30, 100, "v") == 30
    assert resolve_size(30.0, 100, "v") == 30  # a whole float from a CLI override is a count
    for bad in (100, -1, 1.5, "10", True):
        with pytest.raises(QexpError):
            resolve_size(bad, 100, "v")


# ----------------------------------------------------------------------------------- digits


def test_digits_splits() -> None:
    from qexp.data.digits import DIGITS_MEAN, DIGITS_STD, Digits, load_digits_uint8

    dm = Digits()
    assert (dm.num_train, dm.num_val, dm.num_test) == (1294, 144, 359)
    assert dm.info == DataInfo("digits", num_classes=10, in_channels=1, image_size=8)

    # The three splits partition the 1797 images (compared as multisets of image+label).
    def rows(x: torch.Tensor, y: torch.Tensor) -> Counter:
        return Counter(zip(map(bytes, x.flatten(1).numpy()), y.tolist(), strict=True))

    x_all, y_all = load_digits_uint8()
    parts = [rows(*dm._cpu[s]) for s in ("train", "val", "test")]
    assert parts[0] + parts[1] + parts[2] == rows(x_all, y_all)
    # Fixed split seed: a second build gives identical splits.
    again = Digits()
    assert torch.equal(again._cpu["test"][1], dm._cpu["test"][1])
    assert Digits(subset=100).num_train == 100
    scaled = x_all.float() / 255
    assert abs(float(scaled.mean()) - DIGITS_MEAN) < 1e-3
    assert abs(float(scaled.std()) - DIGITS_STD) < 1e-3


# ------------------------------------------------------------------------------ augmentation


def test_crop_is_shift_by_hand() -> None:
    aug = RandomCropFlip(padding=2)
    x = torch.arange(1, 26, dtype=torch.uint8).view(1, 1, 5, 5)
    # Offset (3, 1) in the padded image = shift the image up by 1 and right by 1.
    out = aug.apply(x, torch.tensor([3]), torch.tensor([1]), torch.tensor([False]))
    expected = torch.tensor(
        [
            [0, 6, 7, 8, 9],
            [0, 11, 12, 13, 14],
            [0, 16, 17, 18, 19],
            [0, 21, 22, 23, 24],
            [0, 0, 0, 0, 0],
        ],
        dtype=torch.uint8,
    )
    assert torch.equal(out[0, 0], expected)
    flipped = aug.apply(x, torch.tensor([3]), torch.tensor([1]), torch.tensor([True]))
    assert torch.equal(flipped[0, 0], expected.flip(1))
    # Centre offset, no flip: identity.
    same = aug.apply(x, torch.tensor([2]), torch.tensor([2]), torch.tensor([False]))
    assert torch.equal(same, x)


def test_augment_batch_deterministic() -> None:
    aug = RandomCropFlip(padding=4)
    x = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    a = aug(x, torch.Generator().manual_seed(5))
    b = aug(x, torch.Generator().manual_seed(5))
    c = aug(x, torch.Generator().manual_seed(6))
    assert a.shape == x.shape and a.dtype == x.dtype
    assert torch.equal(a, b) and not torch.equal(a, c)
    # __call__ is exactly apply() with the parameters drawn from the same generator.
    params = aug.sample_params(16, torch.Generator().manual_seed(5))
    assert torch.equal(a, aug.apply(x, *params))
    # Each output is a crop of its own image: sample 0 checked against a direct slice.
    oy, ox, flip = (int(p[0]) for p in params)
    padded = torch.nn.functional.pad(x[0], (4, 4, 4, 4))
    crop = padded[:, oy : oy + 32, ox : ox + 32]
    assert torch.equal(a[0], crop.flip(2) if flip else crop)


def test_augmented_module_batches() -> None:
    dm = fake_module(n=40, channels=3, size=8, augment=RandomCropFlip(padding=4))
    a = [(x, y) for x, y in dm.train_batches(16, 1, 0, CPU)]
    b = [(x, y) for x, y in dm.train_batches(16, 1, 0, CPU)]
    assert [x.shape for x, _ in a] == [(16, 3, 8, 8), (16, 3, 8, 8), (8, 3, 8, 8)]
    assert all(
        torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(a, b, strict=True)
    )
    # Eval batches are never augmented.
    x_test = torch.cat([x for x, _ in dm.eval_batches("test", 5, CPU)])
    raw = dm._cpu["test"][0]
    torch.testing.assert_close(x_test, (raw.float() / 255 - 0.5) / 0.25)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_batches_match_cpu() -> None:
    dm = fake_module(n=40, channels=3, size=8, augment=RandomCropFlip(padding=4))
    cuda = torch.device("cuda")
    for (xc, yc), (xg, yg) in zip(
        dm.train_batches(16, 2, 9, CPU), dm.train_batches(16, 2, 9, cuda), strict=True
    ):
        assert xg.is_cuda and yg.is_cuda
        torch.testing.assert_close(xg.cpu(), xc)
        assert torch.equal(yg.cpu(), yc)


# -------------------------------------------------------------------------- CIFAR, folders


def test_cifar_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from qexp.data.cifar import CIFAR10, CIFAR100

    monkeypatch.setenv("QEXP_DATA", str(tmp_path))
    for cls in (CIFAR10, CIFAR100):
        with pytest.raises(QexpError) as err:
            cls(download=False)
        msg = str(err.value)
        assert "dataset.root" in msg and "QEXP_DATA" in msg and "download" in msg
    with pytest.raises(QexpError, match="cifar-10-batches-py"):
        CIFAR10(root=str(tmp_path), download=False)


def _write_image_folder(root: Path, per_class: int = 4) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for sub, n in (("train", per_class), ("val", 2)):
        for cls in ("cat", "dog", "eel"):
            (root / sub / cls).mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 256, size=(20, 24, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / sub / cls / f"{i}.png")


def test_image_folder(tmp_path: Path) -> None:
    from qexp.data.imagefolder import ImageFolderData

    _write_image_folder(tmp_path)
    dm = ImageFolderData(root=str(tmp_path), image_size=16, val_size=3, workers=0)
    assert (dm.num_train, dm.num_val, dm.num_test) == (9, 3, 6)
    assert dm.info == DataInfo("imagefolder", num_classes=3, in_channels=3, image_size=16)
    rng_state = torch.get_rng_state()
    a = list(dm.train_batches(4, 0, 1, CPU))
    assert torch.equal(torch.get_rng_state(), rng_state)
    b = list(dm.train_batches(4, 0, 1, CPU))
    assert [x.shape for x, _ in a] == [(4, 3, 16, 16), (4, 3, 16, 16), (1, 3, 16, 16)]
    assert all(
        torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(a, b, strict=True)
    )
    assert a[0][1].dtype == torch.int64
    test = list(dm.eval_batches("test", 4, CPU))
    assert [len(y) for _, y in test] == [4, 2]
    assert sum(len(y) for _, y in dm.eval_batches("val", 2, CPU)) == 3
    with pytest.raises(QexpError, match="train"):
        ImageFolderData(root=str(tmp_path / "nope"))
    with pytest.raises(QexpError, match="val_size"):
        ImageFolderData(root=str(tmp_path), workers=0)  # default 10000 > 12 images


# ----------------------------------------------------------------------------------- configs


@pytest.mark.parametrize(
    "name", ["fashion_mnist", "mnist", "digits", "cifar10", "cifar100", "imagefolder"]
)
def test_dataset_yaml_matches_builder(name: str) -> None:
    cfg = OmegaConf.load(CONF_DIR / f"{name}.yaml")
    assert cfg.name == name
    module_name, cls_name = cfg._target_.rsplit(".", 1)
    builder = getattr(importlib.import_module(module_name), cls_name)
    params = set(inspect.signature(builder).parameters)
    keys = {k for k in cfg if k != "_target_"}
    assert keys <= params, keys - params
    assert {p for p in params if p != "name"} <= keys  # every option is documented in YAML


def test_digits_via_hydra_instantiate() -> None:
    from hydra.utils import instantiate

    dm = instantiate(OmegaConf.load(CONF_DIR / "digits.yaml"), subset=50)
    assert dm.num_train == 50 and dm.info.name == "digits"


def test_fashion_mnist_is_gz_idx(tmp_path: Path) -> None:
    # Guards the writer used above: the fixture files are real gzip streams.
    write_fake_mnist(tmp_path, n_train=2, n_test=1)
    raw = gzip.decompress((tmp_path / "train-labels-idx1-ubyte.gz").read_bytes())
    assert raw[:4] == b"\x00\x00\x08\x01"
