"""One run: validate the config, build the components, train, test."""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from qexp.config.validate import validate_config
from qexp.train.build import build_data, build_model, resolve_device
from qexp.train.trainer import Trainer

log = logging.getLogger("qexp")


def seed_everything(seed: int) -> None:
    """Seed Python and torch (CPU and CUDA) generators."""
    random.seed(seed)
    torch.manual_seed(seed)


def run_training(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """Train and test the run described by ``cfg`` in ``run_dir``; return its metrics."""
    validate_config(cfg)
    if cfg.trainer.threads is not None:
        torch.set_num_threads(int(cfg.trainer.threads))
    device = resolve_device(cfg.trainer.device)
    seed_everything(int(cfg.seed))
    data = build_data(cfg)
    total_steps = int(cfg.trainer.epochs) * data.steps_per_epoch(int(cfg.trainer.batch_size))
    model = build_model(cfg, data.info, device, total_steps, run_dir)
    log.info(
        "run %s: %s/%s on %s, w%d a%d (first layer %s bits, last %s), %s, %d steps",
        run_dir,
        cfg.estimator.name,
        cfg.quantizer.name,
        cfg.dataset.name,
        cfg.w_bits,
        cfg.a_bits,
        cfg.layers.first_bits,
        cfg.layers.last_bits,
        device,
        total_steps,
    )
    return Trainer(cfg, model, data, run_dir, device).fit()
