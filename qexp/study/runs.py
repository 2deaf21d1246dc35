"""Compose and train the ordinary qexp runs of a study, in this process.

Every run of a study is a normal run dir: ``.hydra/config.yaml`` (so ``qexp compare`` groups it
by its config), ``train.log``, TensorBoard events, checkpoints and ``metrics.json``. Runs are
locked while they train (qexp.rundir_lock), like any `qexp train`.
"""

from __future__ import annotations

import contextlib
import logging
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf

from qexp.config.schema import register_schemas
from qexp.config.validate import validate_config
from qexp.data.sealed import SealedTest
from qexp.errors import QexpError
from qexp.record import (
    RunRecord,
    atomic_write,
    config_fingerprint,
    mark_failed,
    read_record,
    write_json,
)
from qexp.rundir_lock import hold_run_dir
from qexp.train.parts import EpochHook
from qexp.train.run import build_run
from qexp.train.trainer import Trainer

log = logging.getLogger("qexp")

#: a study's side note in each run dir: its passes per step (the cost columns)
COST_FILE = "study_cost.json"


@contextlib.contextmanager
def hydra_configs() -> Iterator[None]:
    """Hydra's compose API over qexp's config tree for the block."""
    register_schemas()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module(config_module="qexp.conf", version_base=None):
            yield
    finally:
        GlobalHydra.instance().clear()


def compose_run(overrides: list[str]) -> DictConfig:
    """The validated run config of ``qexp train OVERRIDES`` (inside :func:`hydra_configs`)."""
    try:
        cfg = compose("config", list(overrides))
    except Exception as exc:  # unknown option or key: Hydra's message, one line
        raise QexpError(f"{' '.join(overrides)}: {str(exc).splitlines()[0]}") from None
    validate_config(cfg)
    return cfg


def completed(run_dir: Path, cfg: DictConfig) -> RunRecord | None:
    """The record of ``run_dir`` if it holds a completed run of ``cfg``, else None."""
    record = read_record(run_dir)
    if record is None or not record.completed:
        return None
    return record if record.config_hash == config_fingerprint(cfg) else None


@contextlib.contextmanager
def _run_log(run_dir: Path) -> Iterator[None]:
    """The qexp logger's records go to ``run_dir/train.log`` while the run trains."""
    run_dir.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(run_dir / "train.log")
    handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    logger = logging.getLogger("qexp")
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
        handler.close()


def train_run(
    cfg: DictConfig,
    run_dir: Path,
    on_epoch: EpochHook | None = None,
    seal_test: bool = False,
) -> dict[str, Any]:
    """Train ``cfg`` in ``run_dir`` (resuming its last checkpoint when ``cfg.resume``).

    ``seal_test``: a tuning run, whose data refuses to hand out the test split and which ends
    without a test. Errors are recorded in ``metrics.json`` (failed, with the reason) and
    re-raised; ``optuna.TrialPruned`` from ``on_epoch`` passes through, recorded as pruned.
    """
    run_dir = Path(run_dir)
    with hold_run_dir(run_dir), _run_log(run_dir):
        text = OmegaConf.to_yaml(cfg).encode()
        atomic_write(run_dir / ".hydra" / "config.yaml", lambda f: f.write(text))
        try:
            parts = build_run(cfg, run_dir)
            if seal_test:
                parts.data = SealedTest(parts.data)
            parts.on_epoch = on_epoch
            write_json(parts.model.estimator.passes_per_step(), run_dir / COST_FILE)
            return Trainer(parts).fit()
        except Exception as exc:
            reason = _reason(exc)
            log.error("run %s stopped: %s\n%s", run_dir, reason, traceback.format_exc(limit=8))
            mark_failed(run_dir, reason, config_fingerprint(cfg))
            raise


def _reason(exc: BaseException) -> str:
    if type(exc).__name__ == "TrialPruned":
        return "pruned by the tuner (validation curve below the median of earlier trials)"
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text[:300] if isinstance(exc, QexpError) else f"{type(exc).__name__}: {text[:300]}"


def fp_train(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """The training function handed to the full-precision cache (qexp.train.partner)."""
    return train_run(cfg, run_dir)
