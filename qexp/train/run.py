"""The composition root: the one place that reads a run's composed config and assembles it.

``build_run`` turns the config into ready parts (data, quantized model with its estimator and
partner, optimizer, LR curve, precision monitor, typed trainer settings, run identity);
``run_training`` hands them to the :class:`~qexp.train.trainer.Trainer`. Everything below this
module gets only the parts it needs, never the config; the full-precision partner is trained
through ``run_training`` itself, passed down as a function, so nothing calls back up here.
"""

from __future__ import annotations

import logging
import random
import shutil
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from qexp.config.validate import validate_config
from qexp.data.base import DataInfo
from qexp.estimators.model import QuantModel
from qexp.quant.budget import budget_from_node
from qexp.quant.wrap import LayerBits, quantize_model
from qexp.record import config_fingerprint
from qexp.spec import TrainerSettings
from qexp.train import distributed
from qexp.train.build import (
    build_data,
    build_estimator,
    build_net,
    instantiate,
    load_initial_weights,
    quantizer_factory,
    resolve_device,
    wire_estimator,
)
from qexp.train.memory import hide_triton_without_gpu
from qexp.train.optim import build_optimizer
from qexp.train.partner import get_partner
from qexp.train.parts import RunInfo, RunParts
from qexp.train.precision import PrecisionMonitor
from qexp.train.trainer import Trainer

log = logging.getLogger("qexp")


def seed_everything(seed: int) -> None:
    """Seed Python and torch (CPU and CUDA) generators."""
    random.seed(seed)
    torch.manual_seed(seed)


def trainer_settings(cfg: DictConfig) -> TrainerSettings:
    """The ``trainer`` node as the typed :class:`TrainerSettings`."""
    node = OmegaConf.to_container(cfg.trainer, resolve=True)
    assert isinstance(node, dict)
    return TrainerSettings(**node)


def run_identity(cfg: DictConfig, settings: TrainerSettings) -> dict[str, Any]:
    """The fields that say which run this is; they head its ``metrics.json``."""
    return {
        "estimator": cfg.estimator.name,
        "quantizer": cfg.quantizer.name,
        "model": cfg.model.name,
        "dataset": cfg.dataset.name,
        "w_bits": int(cfg.w_bits),
        "a_bits": int(cfg.a_bits),
        "seed": int(cfg.seed),
        "epochs": int(settings.epochs),
        "lr": float(settings.lr),
        "optimizer": settings.optimizer,
        "batch_size": int(settings.batch_size),
        "first_bits": cfg.layers.first_bits,
        "last_bits": cfg.layers.last_bits,
        "tag": cfg.get("tag"),
    }


def build_quantized_net(cfg: DictConfig, info: DataInfo) -> nn.Module:
    """The float network of ``cfg`` with its Conv2d/Linear layers swapped for quantized ones."""
    net = build_net(cfg.model, info)
    quantize_model(
        net,
        body=quantizer_factory(cfg.quantizer, "quantizer"),
        edge=quantizer_factory(cfg.layers.edge_quantizer, "layers.edge_quantizer"),
        body_bits=LayerBits(int(cfg.w_bits), int(cfg.a_bits)),
        first_bits=cfg.layers.first_bits,
        last_bits=cfg.layers.last_bits,
    )
    return net


def build_model(
    cfg: DictConfig,
    info: DataInfo,
    device: torch.device,
    total_steps: int,
    run_dir: Path | None = None,
) -> QuantModel:
    """The quantized network of ``cfg`` with its estimator attached (and its partner, trained
    or loaded first when the estimator needs one)."""
    net = build_quantized_net(cfg, info)
    estimator = build_estimator(cfg.estimator)
    model = QuantModel(net, estimator).to(device)
    if cfg.get("init_from"):
        load_initial_weights(model, str(cfg.init_from))
    estimator.check_model(net)  # before any costly preparation such as training a partner
    partner = get_partner(cfg, info, device, run_training) if estimator.needs_partner else None
    return wire_estimator(model, device, total_steps, run_dir, partner)


def build_run(cfg: DictConfig, run_dir: Path) -> RunParts:
    """Validate ``cfg`` and assemble the parts of its run in ``run_dir``."""
    validate_config(cfg)
    hide_triton_without_gpu()  # before the optimizer imports torch._dynamo
    settings = trainer_settings(cfg)
    if settings.threads is not None:
        torch.set_num_threads(int(settings.threads))
    device = resolve_device(settings.device)
    # several processes (torchrun, or Slurm tasks): join them; every rank builds the same run
    dist = distributed.env_world()
    device = distributed.init(dist, device)
    run_dir = _shared_run_dir(run_dir, dist)
    seed_everything(int(cfg.seed))
    data = build_data(cfg.dataset)
    total_steps = int(settings.epochs) * data.steps_per_epoch(int(settings.batch_size))
    model = build_model(cfg, data.info, device, total_steps, run_dir)
    optimizer = build_optimizer(model, settings)
    lr_curve = instantiate(cfg.schedule.lr, "schedule.lr")
    quantizer_node = OmegaConf.to_container(cfg.quantizer, resolve=True)
    budget = budget_from_node(quantizer_node if isinstance(quantizer_node, dict) else None)
    info = data.info
    example = torch.zeros(1, info.in_channels, info.image_size, info.image_size, device=device)
    precision = PrecisionMonitor(model.net, budget, example)
    run = RunInfo(run_dir, int(cfg.seed), config_fingerprint(cfg), run_identity(cfg, settings))
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
    distributed.broadcast_state(model, dist)  # same seed, same weights; made certain
    return RunParts(
        settings, model, data, optimizer, lr_curve, precision, run, device, bool(cfg.resume),
        dist=dist,
    )


def _shared_run_dir(run_dir: Path, dist: distributed.DistInfo) -> Path:
    """Rank 0's run dir on every rank (a timestamped default may differ by a second between
    ranks); other ranks log warnings only and remove a dir of their own that holds nothing
    but Hydra's files."""
    if dist.world <= 1:
        return run_dir
    main_dir = Path(str(distributed.from_main(str(run_dir), dist)))
    if not dist.is_main:
        logging.getLogger("qexp").setLevel(logging.WARNING)
        stray = main_dir.resolve() != run_dir.resolve() and run_dir.is_dir()
        if stray and {p.name for p in run_dir.iterdir()} <= {".hydra", "train.log"}:
            shutil.rmtree(run_dir, ignore_errors=True)
    return main_dir


def run_training(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """Train and test the run described by ``cfg`` in ``run_dir``; return its metrics."""
    outermost = not distributed.joined()  # a partner's run nests inside its user's
    try:
        return Trainer(build_run(cfg, run_dir)).fit()
    finally:
        if outermost:
            distributed.shutdown()
