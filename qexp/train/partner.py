"""Full-precision networks trained once and cached: a run's frozen partner (for estimators
with ``needs_partner``) and a study's reference (qexp.study), through one mechanism.

The partner is a plain float model of the run's architecture. It comes from
``partner.source`` (a checkpoint file or a run dir) when that is set; otherwise qexp trains it
once with the ordinary run job (bits=32, STE, same model, data, seed and training settings) and
caches it under ``$QEXP_CACHE/partners/<key>/`` (default cache root ``~/.cache/qexp``), with
``<key>`` a hash of everything that determines it. Every run of a sweep thus reuses one
partner; concurrent jobs serialize on a lock file, so only the first one trains it.

Everything here works on plain config dicts; the training itself is the caller's (the
composition root passes its job function in), so nothing here reaches back up.
"""

from __future__ import annotations

import copy
import fcntl
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qexp.errors import QexpError
from qexp.record import config_fingerprint, read_record
from qexp.spec import BudgetSpec, PartnerSpec
from qexp.train.checkpoint import checkpoint_file, load_checkpoint

#: trains the run of a (plain) config in a run dir: the composition root's job function
TrainFn = Callable[[dict[str, Any], Path], Any]

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
#: the estimator and quantizer of a full-precision run
_FP_ESTIMATOR = {"_target_": "qexp.estimators.ste.STE", "name": "ste"}
_FP_QUANTIZER = {"_target_": "qexp.quant.uniform.UniformQuantizer", "name": "none"}


def cache_root() -> Path:
    """``$QEXP_CACHE``, or ``~/.cache/qexp``."""
    env = os.environ.get("QEXP_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "qexp"


#: prefix of a path inside the cache: ``cache:partners/<key>`` stays valid when a study dir
#: moves to a machine whose cache lives elsewhere, and keeps run fingerprints path-free
CACHE_URI = "cache:"


def cache_uri(path: Path) -> str:
    """``path`` (inside the cache) as a ``cache:`` reference."""
    return CACHE_URI + Path(path).resolve().relative_to(cache_root().resolve()).as_posix()


def resolve_source(source: str) -> Path:
    """A checkpoint file or run dir given in a config: a path, or ``cache:<path in cache>``."""
    if source.startswith(CACHE_URI):
        return cache_root() / source[len(CACHE_URI):]
    return Path(source).expanduser()


def partner_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The (plain) config of the full-precision run that trains the partner of ``config``.

    Same model, data, seed, trainer and LR schedule; full precision in every respect: no
    quantizers anywhere (edge layers included), no budget, plain STE; resumable (a job that
    died mid-training is continued by the next). ``partner.epochs``, when set, replaces
    ``trainer.epochs``.
    """
    plain = copy.deepcopy(dict(config))
    plain.pop("hydra", None)
    plain.update(bits=32, w_bits=32, a_bits=32, resume=True, init_from=None, tag="fp-partner")
    # layers a rule keeps in float stay float (and unwrapped) in the partner; other rules set
    # bits, which a full-precision network has none of
    kept = [{"match": r["match"], "float": True} for r in plain["layers"].get("overrides") or []
            if r.get("float")]  # fmt: skip
    plain["layers"] = {**plain["layers"], "first_bits": None, "last_bits": None,
                       "overrides": kept, "matmul_bits": None, "embed_bits": None}  # fmt: skip
    epochs = (plain.get("partner") or {}).get("epochs")
    if epochs is not None:
        plain["trainer"]["epochs"] = int(epochs)
    plain["trainer"]["histograms"] = False
    plain["estimator"] = dict(_FP_ESTIMATOR)
    # The run's quantizer options and budget must not leak into a float network.
    plain["quantizer"] = dict(_FP_QUANTIZER)
    plain["budget"] = asdict(BudgetSpec())
    plain["partner"] = asdict(PartnerSpec())
    return plain


def partner_key(fp_config: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """(hash, what it hashes) of the settings that determine a trained partner."""
    keyed = {
        "format": PARTNER_FORMAT,
        "model": fp_config["model"],
        "dataset": fp_config["dataset"],
        "seed": fp_config["seed"],
        "trainer": {k: fp_config["trainer"].get(k) for k in _TRAINER_KEYS},
        "schedule_lr": fp_config["schedule"]["lr"],
    }
    digest = hashlib.sha256(json.dumps(keyed, sort_keys=True).encode()).hexdigest()[:16]
    return digest, keyed


def cached_dir(fp_config: Mapping[str, Any]) -> Path:
    """Where the cache keeps the run of ``fp_config`` (trained or not)."""
    return cache_root() / "partners" / partner_key(fp_config)[0]


def _completed(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds a finished partner run."""
    record = read_record(run_dir)
    return record is not None and record.completed and (run_dir / "checkpoints/best.pt").is_file()


def _discard_foreign_partial(run_dir: Path, fp_config: Mapping[str, Any]) -> None:
    """Delete an unfinished partner run whose config differs from ``fp_config`` in settings
    that do not change the partner (e.g. the LP run's tag), which the trainer would refuse to
    resume; a matching one is resumed instead."""
    last = run_dir / "checkpoints" / "last.pt"
    if last.is_file() and load_checkpoint(last).get("config_hash") != config_fingerprint(
        fp_config
    ):
        log.info("discarding an unfinished partner run with other settings in %s", run_dir)
        shutil.rmtree(run_dir / "checkpoints")


def cached_fp_run(fp_config: Mapping[str, Any], train: TrainFn, what: str = "partner") -> Path:
    """The cache's run dir of the full-precision run ``fp_config`` (a :func:`partner_config`),
    trained there with ``train`` first unless a finished one is there; shared by the partner of
    block replacement and the reference of a study, so each is trained once. ``what`` names it
    in the log."""
    key, keyed = partner_key(fp_config)
    run_dir = cache_root() / "partners" / key
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir.parent / f"{key}.lock", "a+") as lock:
        # Another job of the sweep may be training this very network: wait for it, then reuse.
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            if _completed(run_dir):
                log.info("reusing the cached full-precision %s %s", what, run_dir)
            else:
                log.info("training the full-precision %s (cached in %s)", what, run_dir)
                _discard_foreign_partial(run_dir, fp_config)
                (run_dir / "partner.json").write_text(json.dumps(keyed, indent=2) + "\n")
                try:
                    train(dict(fp_config), run_dir)
                except QexpError as exc:
                    raise QexpError(f"training the full-precision {what} failed: {exc}") from None
                record = read_record(run_dir)
                acc = record.get("test_acc", -1) if record else -1
                log.info("full-precision %s trained: test_acc %.4f", what, acc)
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)
    return run_dir


def load_partner_weights(net: nn.Module, source: Path, model_name: str) -> nn.Module:
    """``net`` (a plain float model) with the network weights of ``source``, frozen.

    ``source`` is a qexp checkpoint (keys ``net.*``), a run dir, or a plain state_dict of the
    model. Every tensor of the model must be there; quantizer state of a quantized run is
    ignored (its latent weights are then used at full precision, with a warning).
    """
    path = checkpoint_file(Path(source), "partner.source")
    ckpt = load_checkpoint(path)
    state = ckpt.get("model", ckpt)
    if any(k.startswith("net.") for k in state):
        state = {k[4:]: v for k, v in state.items() if k.startswith("net.")}
    quant = {k for k in state if ".w_quant." in k or ".a_quant." in k}
    if quant:
        log.warning("partner %s comes from a quantized run: using its latent weights", path)
        state = {k: v for k, v in state.items() if k not in quant}
    missing, unexpected = net.load_state_dict(state, strict=False)
    if missing or unexpected:
        what = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise QexpError(f"partner checkpoint {path} does not fit model {model_name}: {what}")
    return freeze(net)


def freeze(net: nn.Module, device: torch.device | None = None) -> nn.Module:
    """``net`` in eval mode with no parameter requiring gradients (on ``device``)."""
    if device is not None:
        net.to(device)
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net
