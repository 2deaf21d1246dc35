"""Atomic checkpoint files that load with ``torch.load(weights_only=True)``."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import torch

from qexp.errors import QexpError
from qexp.record import atomic_write


def save_checkpoint(obj: dict[str, Any], path: Path) -> None:
    """Save ``obj`` (tensors, numbers, strings, lists, dicts) atomically."""
    atomic_write(path, lambda f: torch.save(obj, f))


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True``; unreadable files raise QexpError."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise QexpError(f"checkpoint {path} does not exist") from None
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0][:120] if str(exc).strip() else type(exc).__name__
        raise QexpError(
            f"checkpoint {path} is corrupt or unreadable ({reason}): delete it to restart "
            "that run, or resume from another run dir"
        ) from None


def checkpoint_file(path: Path, key: str) -> Path:
    """A checkpoint file from a file path or a run dir (its best, then its last checkpoint).

    ``key`` names the option the path came from, for the error message.
    """
    if path.is_dir():
        for name in ("best.pt", "last.pt"):
            if (path / "checkpoints" / name).is_file():
                return path / "checkpoints" / name
        raise QexpError(f"{key}={path}: no checkpoints/best.pt or last.pt in that run dir")
    if not path.is_file():
        raise QexpError(f"{key}={path}: no such checkpoint file or run dir")
    return path


def rng_state() -> dict[str, Any]:
    """Random number generator states that training uses (torch CPU/CUDA, Python)."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": list(random.getstate()[1])}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the generators saved by :func:`rng_state`."""
    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(state["python"]), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
