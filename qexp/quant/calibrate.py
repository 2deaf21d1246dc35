"""Calibration: the explicit phase in which quantizers take their data-derived state.

Quantizers whose grid depends on data (activation ranges, LSQ's initial step, PACT's initial
clip, the learned-precision quantizers' initial range) read it from the values they see while
``observing`` is on. Nothing else calibrates them: asking an uncalibrated quantizer for its grid
is an error, never a silent calibration on whatever batch comes first.

The phase is switched on for the forward of the first training batch (:func:`calibration`), so
the statistics come from the very batch and network state that training starts from. After it,
only quantizers that track statistics through training (``tracks_during_training``, e.g. the
uniform quantizer's EMA activation range) keep observing, and only in training forwards.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from qexp.quant.base import Quantizer


def quantizers(model: nn.Module) -> list[Quantizer]:
    """Every quantizer of ``model``, in registration order."""
    return [m for m in model.modules() if isinstance(m, Quantizer)]


def set_observing(model: nn.Module, phase: str) -> None:
    """Switch observers for ``phase``: "calibrate" (all on), "train" (only quantizers that track
    statistics through training) or "off"."""
    if phase not in ("calibrate", "train", "off"):
        raise ValueError(f"phase must be 'calibrate', 'train' or 'off', got {phase!r}")
    for q in quantizers(model):
        q.observing = phase == "calibrate" or (phase == "train" and q.tracks_during_training)


def uncalibrated(model: nn.Module) -> list[str]:
    """Names of the quantizers of ``model`` that have not seen their calibration data."""
    return [
        n for n, m in model.named_modules() if isinstance(m, Quantizer) and not m.is_calibrated()
    ]


@contextmanager
def calibration(model: nn.Module) -> Iterator[None]:
    """Observers on for the forwards inside the block, then the training phase.

    Raises RuntimeError on exit if a quantizer saw no data (a layer the forward never reached).
    """
    set_observing(model, "calibrate")
    try:
        yield
    finally:
        set_observing(model, "train")
    missing = uncalibrated(model)
    if missing:
        raise RuntimeError(f"quantizers saw no data during calibration: {', '.join(missing)}")


@torch.no_grad()
def calibrate(model: nn.Module, x: Tensor) -> None:
    """Calibrate ``model`` on the batch ``x`` with one forward in training mode, outside of any
    training step (for tools and tests; the trainer calibrates on its first training batch).

    BatchNorm running statistics are left as they were.
    """
    was_training = model.training
    bn_keys = ("running_mean", "running_var", "num_batches_tracked")
    saved = {k: v.clone() for k, v in model.state_dict().items() if k.endswith(bn_keys)}
    model.train()
    try:
        with calibration(model):
            model(x)
    finally:
        model.train(was_training)
        model.load_state_dict(saved, strict=False)
