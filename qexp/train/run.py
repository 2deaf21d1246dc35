"""The composition root: the one place that reads a run's composed config and assembles it.

:func:`run_spec` reads the composed config once into a frozen :class:`~qexp.spec.RunSpec`;
nothing below this module sees the config. :func:`build_run` turns a spec into ready parts
(data, quantized model with its estimator and partner, optimizer, LR curve, precision monitor)
for the :class:`~qexp.train.trainer.Trainer`; :func:`train_run` trains them. The partner of
estimators that need one is resolved to a file before the model is built (trained once into
the cache through the ordinary job lifecycle, qexp.train.job); evaluating or exporting a run
never trains anything.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
from pathlib import Path
from typing import Any

import hydra.utils
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from qexp.bitwidth import as_bits
from qexp.config.schema import register_schemas
from qexp.config.validate import validate_config
from qexp.data.base import DataInfo, DataModule
from qexp.data.sealed import SealedTest
from qexp.errors import QexpError
from qexp.estimators.model import QuantModel
from qexp.quant.budget import budget_from_spec
from qexp.quant.overrides import LayerPlan, resolve_plan
from qexp.quant.wrap import LayerBits, quantize_model
from qexp.record import config_fingerprint
from qexp.spec import BudgetSpec, LayersSpec, PartnerSpec, RunSpec, TrainerSettings
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
from qexp.train.checkpoint import rng_state, set_rng_state
from qexp.train.job import JobResult, Policy, run_job
from qexp.train.memory import hide_triton_without_gpu
from qexp.train.optim import build_optimizer
from qexp.train.partner import (
    cached_fp_run,
    freeze,
    load_partner_weights,
    partner_config,
    resolve_source,
)
from qexp.train.parts import EpochHook, RunInfo, RunParts
from qexp.train.precision import PrecisionMonitor
from qexp.train.trainer import Trainer

log = logging.getLogger("qexp")


# -- reading the config --------------------------------------------------------------------------
def run_spec(cfg: DictConfig | dict[str, Any]) -> RunSpec:
    """The typed spec of a composed run config (validated first when it is a DictConfig)."""
    if isinstance(cfg, DictConfig):
        validate_config(cfg)
        plain = OmegaConf.to_container(cfg, resolve=True)
        assert isinstance(plain, dict)
    else:
        plain = dict(cfg)
    plain.pop("hydra", None)
    trainer = TrainerSettings(**plain["trainer"])
    rules = tuple(plain["layers"].get("overrides") or ())
    layers = LayersSpec(**{**plain["layers"], "overrides": rules})
    identity = {
        "estimator": _name(plain["estimator"]),
        "quantizer": _name(plain["quantizer"]),
        "model": _name(plain["model"]),
        "dataset": _name(plain["dataset"]),
        "w_bits": as_bits(plain["w_bits"]),
        "a_bits": as_bits(plain["a_bits"]),
        "seed": int(plain["seed"]),
        "epochs": int(trainer.epochs),
        "lr": float(trainer.lr),
        "optimizer": trainer.optimizer,
        "batch_size": int(trainer.batch_size),
        "first_bits": layers.first_bits,
        "last_bits": layers.last_bits,
        "tag": plain.get("tag"),
    }
    return RunSpec(
        config=plain,
        fingerprint=config_fingerprint(plain),
        identity=identity,
        seed=int(plain["seed"]),
        w_bits=as_bits(plain["w_bits"]),
        a_bits=as_bits(plain["a_bits"]),
        model=plain["model"],
        dataset=plain["dataset"],
        quantizer=plain["quantizer"],
        estimator=plain["estimator"],
        lr_schedule=plain["schedule"]["lr"],
        layers=layers,
        budget=BudgetSpec(**(plain.get("budget") or {})),
        trainer=trainer,
        partner=PartnerSpec(**(plain.get("partner") or {})),
        init_from=plain.get("init_from"),
        resume=bool(plain.get("resume")),
    )


def _name(node: dict[str, Any]) -> str:
    """A component's label: its ``name``, else its class name."""
    if node.get("name"):
        return str(node["name"])
    target = str(node.get("_target_") or node.get("weight", {}).get("_target_", "none"))
    return target.rpartition(".")[2].lower()


def load_run_spec(run_dir: Path) -> RunSpec:
    """The spec of the run in ``run_dir``, from its ``.hydra/config.yaml``."""
    path = Path(run_dir) / ".hydra" / "config.yaml"
    if not path.is_file():
        raise QexpError(f"{run_dir} is not a qexp run dir (no .hydra/config.yaml)")
    register_schemas()
    return run_spec(OmegaConf.load(path))


# -- building ------------------------------------------------------------------------------------
#: data sets built so far in this process, by their config (a study's workers keep theirs)
_DATA_CACHE: dict[str, DataModule] | None = None


def enable_data_cache() -> None:
    """Keep every data set this process builds, for the next run with the same dataset
    config (long-lived study workers: the data is loaded once per worker, not once per run)."""
    global _DATA_CACHE
    if _DATA_CACHE is None:
        _DATA_CACHE = {}


def _data(node: dict[str, Any]) -> DataModule:
    if _DATA_CACHE is None:
        return build_data(node)
    key = json.dumps(node, sort_keys=True)
    if key not in _DATA_CACHE:
        _DATA_CACHE[key] = build_data(node)
    return _DATA_CACHE[key]


def seed_everything(seed: int) -> None:
    """Seed Python and torch (CPU and CUDA) generators."""
    random.seed(seed)
    torch.manual_seed(seed)


def layer_plan(spec: RunSpec, net: nn.Module) -> LayerPlan:
    """Every quantizable layer's settings: the first/last policy, then the override rules."""
    layers = spec.layers
    bits = LayerBits(spec.w_bits, spec.a_bits)
    return resolve_plan(
        net, list(layers.overrides), bits, layers.first_bits, layers.last_bits,
        layers.embed_bits, layers.matmul_bits,
    )  # fmt: skip


def build_quantized_net(spec: RunSpec, info: DataInfo) -> nn.Module:
    """The float network of ``spec`` with its Conv2d/Linear layers, and its embeddings and
    products where ``layers.embed_bits`` / ``layers.matmul_bits`` ask, swapped for quantized
    ones (each at the bits its :func:`layer_plan` row says)."""
    net = build_net(spec.model, info)
    quantize_model(
        net,
        body=quantizer_factory(spec.quantizer, "quantizer"),
        edge=quantizer_factory(spec.layers.edge_quantizer, "layers.edge_quantizer"),
        body_bits=LayerBits(spec.w_bits, spec.a_bits),
        first_bits=spec.layers.first_bits,
        last_bits=spec.layers.last_bits,
        plan=layer_plan(spec, net),
    )
    return net


def needs_partner(spec: RunSpec) -> bool:
    """Whether the run's estimator trains against a frozen full-precision partner."""
    return bool(hydra.utils.get_class(spec.estimator["_target_"]).needs_partner)


def resolve_partner(spec: RunSpec, info: DataInfo) -> Path:
    """The partner's checkpoint file or run dir: ``partner.source``, or the cached
    full-precision run of the spec, trained first when missing. The estimator checks the model
    before that costly step; the RNG state is left as it was."""
    saved = rng_state()
    try:
        build_estimator(spec.estimator).check_model(build_net(spec.model, info))
        if spec.partner.source:
            return resolve_source(spec.partner.source)
        return cached_fp_run(partner_config(spec.config), train_cached_run)
    finally:
        set_rng_state(saved)


def train_cached_run(config: dict[str, Any], run_dir: Path) -> JobResult:
    """Train a cached full-precision run (partner or study reference) as its own job."""
    return run_job(run_spec(config), run_dir, train_run, Policy.AUTO, standalone=True)


def build_model(
    spec: RunSpec,
    info: DataInfo,
    device: torch.device,
    total_steps: int,
    run_dir: Path | None = None,
    partner: Path | None = None,
) -> QuantModel:
    """The quantized network of ``spec`` with its estimator attached.

    An estimator that needs a partner gets the float network of ``partner``; without one (to
    evaluate or export a trained run, which never reads the partner) an untrained stand-in of
    the same architecture.
    """
    net = build_quantized_net(spec, info)
    estimator = build_estimator(spec.estimator)
    model = QuantModel(net, estimator).to(device)
    if spec.init_from:
        load_initial_weights(model, resolve_source(spec.init_from), spec.init_from)
    estimator.check_model(net)
    partner_net = None
    if estimator.needs_partner:
        saved = rng_state()  # the stand-in's init must not shift the run's random numbers
        float_net = build_net(spec.model, info)
        set_rng_state(saved)
        model_name = _name(spec.model)
        partner_net = (
            load_partner_weights(float_net, partner, model_name) if partner else freeze(float_net)
        )
        partner_net.to(device)
    return wire_estimator(model, device, total_steps, run_dir, partner_net)


def build_run(
    spec: RunSpec, run_dir: Path, on_epoch: EpochHook | None = None, seal_test: bool = False
) -> RunParts:
    """Assemble the parts of the run of ``spec`` in ``run_dir``.

    ``on_epoch``: called after every epoch (a tuner's pruning); ``seal_test``: a tuning run,
    whose data refuses to hand out the test split and which ends without a test.
    """
    hide_triton_without_gpu()  # before the optimizer imports torch._dynamo
    settings = spec.trainer
    if settings.threads is not None:
        torch.set_num_threads(int(settings.threads))
    device = resolve_device(settings.device)
    # several processes (torchrun, or Slurm tasks): join them; every rank builds the same run
    dist = distributed.env_world()
    device = distributed.init(dist, device)
    run_dir = _shared_run_dir(run_dir, dist)
    seed_everything(spec.seed)
    data = _data(spec.dataset)
    total_steps = int(settings.epochs) * data.steps_per_epoch(int(settings.batch_size))
    partner = resolve_partner(spec, data.info) if needs_partner(spec) else None
    model = build_model(spec, data.info, device, total_steps, run_dir, partner)
    optimizer = build_optimizer(model, settings)
    lr_curve = instantiate(spec.lr_schedule, "schedule.lr")
    budget = budget_from_spec(spec.budget)
    precision = PrecisionMonitor(model.net, budget, data.info.example_input(device))
    run = RunInfo(run_dir, spec.seed, spec.fingerprint, dict(spec.identity), spec.config)
    log.info(
        "run %s: %s/%s on %s, w%s a%s (first layer %s bits, last %s), %s, %d steps",
        run_dir, spec.identity["estimator"], spec.identity["quantizer"],
        spec.identity["dataset"], spec.w_bits, spec.a_bits, spec.layers.first_bits,
        spec.layers.last_bits, device, total_steps,
    )  # fmt: skip
    distributed.broadcast_state(model, dist)  # same seed, same weights; made certain
    return RunParts(
        settings, model, SealedTest(data) if seal_test else data, optimizer, lr_curve,
        precision, run, device, spec.resume, on_epoch=on_epoch, dist=dist,
        layer_plan=layer_plan(spec, model.net),
    )  # fmt: skip


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


# -- training ------------------------------------------------------------------------------------
def train_run(
    spec: RunSpec, run_dir: Path, on_epoch: EpochHook | None = None, seal_test: bool = False
) -> dict[str, Any]:
    """Train and test the run of ``spec`` in ``run_dir``; return its metrics (the job
    lifecycle's train function)."""
    outermost = not distributed.joined()  # a partner's run nests inside its user's
    try:
        return Trainer(build_run(spec, run_dir, on_epoch, seal_test)).fit()
    finally:
        if outermost:
            distributed.shutdown()


def run_training(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """Train and test the run of a composed config in ``run_dir`` (no job lifecycle: no lock,
    no skip or resume decision); return its metrics."""
    return train_run(run_spec(cfg), run_dir)
