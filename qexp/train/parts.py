"""The ready-made parts of one run, as the composition root hands them to the trainer."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from qexp.curves import Curve
from qexp.data.base import DataModule
from qexp.estimators.model import QuantModel
from qexp.quant.overrides import LayerPlan
from qexp.spec import TrainerSettings
from qexp.train import distributed
from qexp.train.precision import PrecisionMonitor

#: called after every epoch with the history so far (one dict per epoch, ``val_acc`` included);
#: returns True to stop training there (it may also raise, e.g. a tuner pruning the run)
EpochHook = Callable[[list[dict[str, Any]]], bool]


@dataclass
class RunInfo:
    """Who the run is: where it writes, its seed, its config fingerprint, the identity fields
    (estimator, quantizer, model, bits, ...) that head its ``metrics.json``, and the resolved
    config that ends it (so reports read a run's settings from its record alone)."""

    run_dir: Path
    seed: int
    fingerprint: str
    identity: dict[str, Any]
    config: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunParts:
    """Everything a :class:`~qexp.train.trainer.Trainer` needs, assembled from one config."""

    settings: TrainerSettings
    model: QuantModel
    data: DataModule
    optimizer: torch.optim.Optimizer
    lr_curve: Curve
    precision: PrecisionMonitor
    run: RunInfo
    device: torch.device
    resume: bool
    #: called after each epoch (e.g. a tuner's pruning); set by the caller after build_run
    on_epoch: EpochHook | None = None
    dist: distributed.DistInfo = distributed.SINGLE
    #: each layer's resolved settings (first/last policy and override rules)
    layer_plan: LayerPlan | None = None
