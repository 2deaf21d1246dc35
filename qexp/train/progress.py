"""Where a run stands: the state a checkpoint saves and a resumed run restores."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Progress:
    """Epochs and steps done, the best validation epoch so far, time and samples trained, and
    one history row per epoch (``val_acc`` included)."""

    epoch: int = 0
    step: int = 0
    best_val: float = -1.0
    best_epoch: int = -1
    train_time: float = 0.0
    samples: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)

    def state(self) -> dict[str, Any]:
        """The fields as checkpoint entries."""
        return {
            "epoch": self.epoch,
            "step": self.step,
            "best_val": self.best_val,
            "best_epoch": self.best_epoch,
            "train_time": self.train_time,
            "samples": self.samples,
            "history": self.history,
        }

    def restore(self, state: dict[str, Any]) -> None:
        """Take the fields back from a checkpoint's entries."""
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        self.best_val, self.best_epoch = float(state["best_val"]), int(state["best_epoch"])
        self.train_time, self.samples = float(state["train_time"]), int(state["samples"])
        self.history = list(state["history"])

    def summary(self) -> dict[str, Any]:
        """The progress fields of metrics.json."""
        return {
            "epochs_done": self.epoch,
            "best_val_acc": self.best_val if self.best_val >= 0 else None,
            "best_epoch": self.best_epoch + 1 if self.best_epoch >= 0 else None,
            "train_time_s": round(self.train_time, 3),
            "samples_per_s": round(self.samples / self.train_time, 1) if self.train_time else None,
            "history": self.history,
        }
