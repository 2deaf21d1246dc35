"""Atomic checkpoint files that load with ``torch.load(weights_only=True)``, and a run's
checkpoints (resume, best and last) as the trainer's observer."""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any

import torch

from qexp.errors import QexpError
from qexp.record import atomic_write

log = logging.getLogger("qexp")


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


class RunCheckpoints:
    """A run's ``checkpoints/``: ``last.pt`` (everything needed to resume) after every epoch,
    ``best.pt`` (the model) at each new best validation epoch; only rank 0 writes.

    The trainer calls :meth:`resume` before training and :meth:`on_epoch_end` after each epoch.
    """

    def __init__(self, run_dir: Path, fingerprint: str, writes: bool = True) -> None:
        self.run_dir = run_dir
        self.dir = run_dir / "checkpoints"
        self.fingerprint = fingerprint
        self.writes = writes

    @property
    def last(self) -> Path:
        return self.dir / "last.pt"

    @property
    def best(self) -> Path:
        return self.dir / "best.pt"

    def resume(self, trainer: Any) -> bool:
        """Restore ``last.pt`` into the trainer's model, optimizer, scaler, RNG and progress;
        False when there is none yet. A checkpoint of another config is refused."""
        if not self.last.is_file():
            log.info("resume=true but %s has no checkpoint yet: starting afresh", self.run_dir)
            return False
        state = load_checkpoint(self.last)
        if state.get("config_hash") != self.fingerprint:
            raise QexpError(
                f"{self.run_dir} holds a run with a different config: resume it with the same "
                "overrides, or start a new run dir"
            )
        trainer.model.load_state_dict(state["model"])
        trainer.optimizer.load_state_dict(state["optimizer"])
        trainer.step_fn.scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        trainer.progress.restore(state)
        p = trainer.progress
        log.info("resumed %s at epoch %d (step %d)", self.run_dir, p.epoch, p.step)
        return True

    def on_epoch_end(self, trainer: Any, new_best: bool) -> None:
        """``best.pt`` when the epoch just done is the new best, then ``last.pt``."""
        progress = trainer.progress
        if self.writes:
            if new_best:
                save_checkpoint(
                    {"model": trainer.model.state_dict(), "epoch": progress.best_epoch}, self.best
                )
            save_checkpoint(
                {
                    "format": 1,
                    "config_hash": self.fingerprint,
                    **progress.state(),
                    "model": trainer.model.state_dict(),
                    "optimizer": trainer.optimizer.state_dict(),
                    "scaler": trainer.step_fn.scaler.state_dict(),
                    "rng": rng_state(),
                },
                self.last,
            )

    def load_best(self, model: torch.nn.Module) -> None:
        """Load ``best.pt`` into ``model`` when there is one (else the model stays as it is)."""
        if self.best.is_file():
            model.load_state_dict(load_checkpoint(self.best)["model"])
