"""Where data sets live: dataset.root, $QEXP_DATA, system folders, and the download cache."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from qexp.errors import QexpError

DATA_ENV = "QEXP_DATA"  # folder holding data sets the user already has
CACHE_ENV = "QEXP_CACHE"  # qexp's cache root; downloads go to $QEXP_CACHE/data


def env_data_dir() -> Path | None:
    """$QEXP_DATA as a path, or None when unset or empty."""
    value = os.environ.get(DATA_ENV, "").strip()
    return Path(value).expanduser() if value else None


def cache_data_dir() -> Path:
    """Download folder: $QEXP_CACHE/data if set, else ~/.cache/qexp/data."""
    value = os.environ.get(CACHE_ENV, "").strip()
    base = Path(value).expanduser() if value else Path.home() / ".cache" / "qexp"
    return base / "data"


def one_line(err: BaseException) -> str:
    """An exception as a single line, for embedding in a QexpError message."""
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def unique(paths: list[Path]) -> list[Path]:
    """Drop repeated paths, keeping the first occurrence (search order matters)."""
    seen: set[Path] = set()
    out = []
    for p in paths:
        if p not in seen:
            seen.add(p)
            out.append(p)
    return out


def download_into(title: str, target: Path, fetch: Callable[[], object], hint: str = "") -> None:
    """Run a torchvision download into `target`, turning any failure into a QexpError."""
    try:
        target.mkdir(parents=True, exist_ok=True)
        fetch()
    except QexpError:
        raise
    except Exception as e:  # network errors, bad checksums, disk full... all user-fixable
        raise QexpError(
            f"downloading {title} into {target} failed ({one_line(e)}); check the network, or "
            f"put the files in a folder and set dataset.root=FOLDER or ${DATA_ENV}"
            + (f" {hint}" if hint else "")
        ) from e
