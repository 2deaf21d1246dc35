"""Unreadable files in dataset=imagefolder: bad_images=error stops naming the file, skip counts."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FAST, read_metrics, run_qexp
from PIL import Image

from qexp.data.imagefolder import ImageFolderData
from qexp.errors import QexpError

CPU = torch.device("cpu")
CLASSES = ("cat", "dog", "eel")


def image_folder(root: Path, per_class: int = 4, fmt: str = "png") -> list[Path]:
    """root/{train,val}/<class>/<i>.<fmt> with random 20x24 RGB images; returns train files."""
    rng = np.random.default_rng(0)
    files = []
    for sub, n in (("train", per_class), ("val", 2)):
        for cls in CLASSES:
            (root / sub / cls).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                pixels = rng.integers(0, 256, size=(20, 24, 3), dtype=np.uint8)
                path = root / sub / cls / f"{i}.{fmt}"
                Image.fromarray(pixels).save(path)
                if sub == "train":
                    files.append(path)
    return files


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def jpeg_cut_in_pixel_data(path: Path) -> None:
    """A JPEG whose header is intact but whose pixel data stops early (passes PIL verify)."""
    pixels = np.random.default_rng(1).integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=95)
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) * 2 // 3])
    with Image.open(path) as image:
        image.verify()  # the up-front scan cannot see this one
    with pytest.raises(OSError), Image.open(path) as image:
        image.convert("RGB")


def all_batches(dm: ImageFolderData) -> list[int]:
    sizes = [len(y) for _, y in dm.train_batches(4, 0, 0, CPU)]
    sizes += [len(y) for _, y in dm.eval_batches("val", 4, CPU)]
    return sizes + [len(y) for _, y in dm.eval_batches("test", 4, CPU)]


def test_truncated_png_stops_before_training_naming_the_file(tmp_path):
    files = image_folder(tmp_path)
    truncate(files[5])
    with pytest.raises(QexpError) as info:
        ImageFolderData(root=str(tmp_path), image_size=16, val_size=3, workers=0)
    message = str(info.value)
    assert str(files[5]) in message and "bad_images=skip" in message
    assert "\n" not in message


def test_skip_leaves_the_file_out_and_counts_it(tmp_path):
    files = image_folder(tmp_path)
    truncate(files[5])
    (tmp_path / "val" / "dog" / "0.png").write_bytes(b"")  # an empty test image
    dm = ImageFolderData(
        root=str(tmp_path), image_size=16, val_size=3, workers=0, bad_images="skip"
    )
    assert dm.num_train + dm.num_val == 11 and dm.num_test == 5
    assert sum(all_batches(dm)) == 16
    report = dm.data_report()["bad_images"]
    assert report["rule"] == "skip" and report["skipped"] == 2
    assert {f["path"] for f in report["files"]} == {str(files[5]), str(tmp_path / "val/dog/0.png")}


@pytest.mark.parametrize("workers", [0, 1])
def test_a_jpeg_that_fails_to_decode_is_caught_when_loaded(tmp_path, workers):
    files = image_folder(tmp_path, fmt="jpg")
    jpeg_cut_in_pixel_data(files[2])
    dm = ImageFolderData(root=str(tmp_path), image_size=16, val_size=3, workers=workers)
    with pytest.raises(QexpError, match="cannot be decoded") as info:
        all_batches(dm)
    assert str(files[2]) in str(info.value) and "\n" not in str(info.value)

    dm = ImageFolderData(
        root=str(tmp_path), image_size=16, val_size=3, workers=workers, bad_images="skip"
    )
    assert dm.num_train + dm.num_val == 12  # the scan let it through
    assert sum(all_batches(dm)) == 17
    assert [f["path"] for f in dm.data_report()["bad_images"]["files"]] == [str(files[2])]


def test_bad_images_rule_is_checked():
    with pytest.raises(QexpError, match="bad_images"):
        ImageFolderData(root="/nonexistent", bad_images="ignore")


# -- through the CLI ------------------------------------------------------------------------
ARGS = [
    *[a for a in FAST if not a.startswith("dataset=")],
    "dataset=imagefolder",
    "dataset.image_size=16",
    "dataset.val_size=3",
    "dataset.workers=0",
    "model=mlp",
    "trainer.epochs=1",
    "trainer.batch_size=4",
]


@pytest.fixture(scope="module")
def folder_with_truncated_png(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("images")
    bad = image_folder(root)[7]
    truncate(bad)
    return root, bad


@pytest.mark.slow
def test_cli_error_names_the_file_before_training(tmp_path, folder_with_truncated_png):
    root, bad = folder_with_truncated_png
    run_dir = tmp_path / "run"
    proc = run_qexp("train", *ARGS, f"dataset.root={root}", f"hydra.run.dir={run_dir}",
                    cwd=tmp_path, check=False)  # fmt: skip
    assert proc.returncode == 2
    err = proc.stderr.strip()
    assert len(err.splitlines()) == 1 and str(bad) in err and "Traceback" not in proc.stderr
    assert not (run_dir / "checkpoints").exists()
    assert not list(run_dir.glob("events.out.tfevents.*"))


@pytest.mark.slow
def test_cli_skip_trains_and_records_the_file(tmp_path, folder_with_truncated_png):
    root, bad = folder_with_truncated_png
    run_dir = tmp_path / "run"
    run_qexp("train", *ARGS, f"dataset.root={root}", "dataset.bad_images=skip",
             f"hydra.run.dir={run_dir}", cwd=tmp_path)  # fmt: skip
    m = read_metrics(run_dir)
    assert m["status"] == "completed"
    assert m["bad_images"]["skipped"] == 1
    assert m["bad_images"]["files"][0]["path"] == str(bad)
    assert str(bad) in (run_dir / "train.log").read_text()
