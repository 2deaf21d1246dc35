"""Full-precision networks trained once and cached: a run's frozen partner (for estimators
with ``needs_partner``) and a study's reference (qexp.study), through one mechanism.

The partner is a plain float model of the run's architecture. It comes from
``estimator.partner`` (a checkpoint file or a run dir) when that is set; otherwise qexp trains
it once with the ordinary runner (bits=32, STE, same model, data, seed and training settings)
and caches it under ``$QEXP_CACHE/partners/<key>/`` (default cache root ``~/.cache/qexp``), with
``<key>`` a hash of everything that determines it. Every run of a sweep thus reuses one partner;
concurrent jobs serialize on a lock file, so only the first one trains it.

This module never calls the runner itself: the composition root passes its training function
in (``train``), so no module below the root reaches back up into it.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from qexp.data.base import DataInfo
from qexp.errors import QexpError
from qexp.record import config_fingerprint, read_record
from qexp.train.build import build_net
from qexp.train.checkpoint import checkpoint_file, load_checkpoint, rng_state, set_rng_state

#: trains the run of a config in a run dir and returns its metrics (the root's run_training)
TrainFn = Callable[[DictConfig, Path], dict[str, Any]]

log = logging.getLogger("qexp")

#: bump when the way partners are trained changes, so old cache entries are not reused
PARTNER_FORMAT = 1
#: trainer settings that change the trained partner (device, threads, logging do not)
_TRAINER_KEYS = (
    "epochs",
    "batch_size",
    "lr",
    "optimizer",
    "momentum",
    "nesterov",
    "weight_decay",
    "grad_clip",
    "amp",
    "amp_dtype",
    "patience",
)


def cache_root() -> Path:
    """``$QEXP_CACHE``, or ``~/.cache/qexp``."""
    env = os.environ.get("QEXP_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "qexp"


def partner_config(cfg: DictConfig) -> DictConfig:
    """The config of the full-precision run that trains ``cfg``'s partner.

    Same model, data, seed, trainer and LR schedule; full precision in every respect: no
    quantizers anywhere (edge layers included), no quantizer options and so no memory budget,
    plain STE; resumable (a job that died mid-training is continued by the next).
    ``estimator.partner_epochs``, when set, replaces ``trainer.epochs``.
    """
    plain = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(plain, dict)
    plain.pop("hydra", None)
    plain.update(bits=32, w_bits=32, a_bits=32, resume=True, init_from=None, tag="fp-partner")
    plain["layers"] = {**plain["layers"], "first_bits": None, "last_bits": None}
    epochs = (plain.get("estimator") or {}).get("partner_epochs")
    if epochs is not None:
        plain["trainer"]["epochs"] = int(epochs)
    plain["trainer"]["histograms"] = False
    plain["estimator"] = {"_target_": "qexp.estimators.ste.STE", "name": "ste"}
    # The run's quantizer options (budgets above all) must not leak into a float network.
    plain["quantizer"] = {"_target_": "qexp.quant.uniform.UniformQuantizer", "name": "none"}
    return OmegaConf.create(plain)


def partner_key(fp_cfg: DictConfig) -> tuple[str, dict[str, Any]]:
    """(hash, what it hashes) of the settings that determine a trained partner."""
    plain = OmegaConf.to_container(fp_cfg, resolve=True)
    assert isinstance(plain, dict)
    keyed = {
        "format": PARTNER_FORMAT,
        "model": plain["model"],
        "dataset": plain["dataset"],
        "seed": plain["seed"],
        "trainer": {k: plain["trainer"].get(k) for k in _TRAINER_KEYS},
        "schedule_lr": plain["schedule"]["lr"],
    }
    digest = hashlib.sha256(json.dumps(keyed, sort_keys=True).encode()).hexdigest()[:16]
    return digest, keyed


def _completed(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds a finished partner run."""
    record = read_record(run_dir)
    return record is not None and record.completed and (run_dir / "checkpoints/best.pt").is_file()


def _discard_foreign_partial(run_dir: Path, fp_cfg: DictConfig) -> None:
    """Delete an unfinished partner run whose config differs from ``fp_cfg`` in settings that
    do not change the partner (e.g. the LP run's quantizer options), which the trainer would
    refuse to resume; a matching one is resumed instead."""
    last = run_dir / "checkpoints" / "last.pt"
    if last.is_file() and load_checkpoint(last).get("config_hash") != config_fingerprint(fp_cfg):
        log.info("discarding an unfinished partner run with other settings in %s", run_dir)
        shutil.rmtree(run_dir / "checkpoints")


def cached_fp_run(fp_cfg: DictConfig, train: TrainFn, what: str = "partner") -> Path:
    """The cache's run dir of the full-precision run ``fp_cfg`` (a :func:`partner_config`),
    trained there with ``train`` first unless a finished one is there; shared by the partner of
    block replacement and the reference of a study, so each is trained once. ``what`` names it
    in the log."""
    key, keyed = partner_key(fp_cfg)
    run_dir = cache_root() / "partners" / key
    run_dir.mkdir(parents=True, exist_ok=True)
    lock_path = run_dir.parent / f"{key}.lock"
    with open(lock_path, "a+") as lock:
        # Another job of the sweep may be training this very network: wait for it, then reuse.
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            if _completed(run_dir):
                log.info("reusing the cached full-precision %s %s", what, run_dir)
            else:
                log.info("training the full-precision %s (cached in %s)", what, run_dir)
                _discard_foreign_partial(run_dir, fp_cfg)
                (run_dir / "partner.json").write_text(json.dumps(keyed, indent=2) + "\n")
                try:
                    metrics = train(fp_cfg, run_dir)
                except QexpError as exc:
                    raise QexpError(f"training the full-precision {what} failed: {exc}") from None
                log.info(
                    "full-precision %s trained: test_acc %.4f", what, metrics.get("test_acc", -1)
                )
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)
    return run_dir


def cached_partner_dir(cfg: DictConfig, train: TrainFn) -> Path:
    """Train the partner of ``cfg`` into the cache with ``train`` unless it is there; return its
    run dir."""
    return cached_fp_run(partner_config(cfg), train)


def load_partner(cfg: DictConfig, info: DataInfo, source: Path) -> nn.Module:
    """A plain float model of ``cfg.model`` with the network weights of ``source``.

    ``source`` is a qexp checkpoint (keys ``net.*``) or a plain state_dict of the model. Every
    tensor of the model must be there; quantizer state of a quantized run is ignored (its
    latent weights are then used at full precision, with a warning).
    """
    path = checkpoint_file(source, "estimator.partner")
    ckpt = load_checkpoint(path)
    state = ckpt.get("model", ckpt)
    if any(k.startswith("net.") for k in state):
        state = {k[4:]: v for k, v in state.items() if k.startswith("net.")}
    quant = [k for k in state if ".w_quant." in k or ".a_quant." in k]
    if quant:
        log.warning("partner %s comes from a quantized run: using its latent weights", path)
        state = {k: v for k, v in state.items() if k not in set(quant)}
    net = build_net(cfg.model, info)
    missing, unexpected = net.load_state_dict(state, strict=False)
    if missing or unexpected:
        what = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise QexpError(f"partner checkpoint {path} does not fit model {cfg.model.name}: {what}")
    return net


def get_partner(
    cfg: DictConfig, info: DataInfo, device: torch.device, train: TrainFn
) -> nn.Module:
    """The run's frozen full-precision partner, in eval mode, on ``device``; ``train`` trains
    it when it is neither given (``estimator.partner``) nor cached.

    The global RNG state is restored afterwards, so whether the partner was trained, loaded
    from the cache or from ``estimator.partner``, the run itself sees the same random numbers.
    """
    saved = rng_state()
    try:
        source = cfg.estimator.get("partner")
        run_dir = Path(str(source)).expanduser() if source else cached_partner_dir(cfg, train)
        net = load_partner(cfg, info, run_dir)
    finally:
        set_rng_state(saved)
    net.to(device).eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net
