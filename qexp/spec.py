"""Typed specs of a run: what the composition root reads out of the composed config, once.

Frozen dataclasses with no Hydra, OmegaConf or torch: the composition root (qexp/train/run.py)
builds them from the config, and everything below it reads only these. The Hydra schema
(qexp/config/schema.py) derives its ``trainer`` node from :class:`TrainerSettings`, so the
trainer's options, their types and defaults are written once.
"""

# No `from __future__ import annotations`: the schema hands these annotations to OmegaConf,
# which needs real types (and typing.Optional rather than "X | None").
# ruff: noqa: UP045

from dataclasses import dataclass
from typing import Optional

#: values of ``trainer.compile`` (qexp/train/compile.py)
COMPILE_MODES = ("off", "on", "auto")
OPTIMIZERS = ("sgd", "adam", "adamw")
PROGRESS_MODES = ("auto", "bar", "log", "none")
AMP_DTYPES = ("bfloat16", "float16")


@dataclass(frozen=True)
class TrainerSettings:
    """Optimisation and hardware settings shared by every run."""

    epochs: int = 3
    batch_size: int = 128
    eval_batch_size: int = 1000
    lr: float = 2e-3
    optimizer: str = "adam"
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0
    quantizer_lr: Optional[float] = None
    grad_clip: Optional[float] = None
    device: str = "auto"
    amp: bool = False
    amp_dtype: str = "bfloat16"
    threads: Optional[int] = None
    log_every: int = 50
    progress: str = "auto"
    histograms: bool = True
    patience: Optional[int] = None
    compile: str = "auto"
