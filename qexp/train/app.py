"""`qexp train`: the Hydra application behind the command."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from qexp.errors import QexpError
from qexp.record import config_fingerprint, mark_failed
from qexp.rundir_lock import RunDirHeld, hold_run_dir
from qexp.train.run import run_training
from qexp.train.sweep import record_held, run_sweep_job

log = logging.getLogger("qexp")


@hydra.main(version_base=None, config_path="pkg://qexp.conf", config_name="config")
def hydra_main(cfg: DictConfig) -> float | None:
    """Run one job; in a sweep a failed job is recorded and the sweep goes on."""
    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    try:
        with hold_run_dir(run_dir):  # one writer per run dir (qexp/rundir_lock.py)
            return _run_job(cfg, run_dir, hc)
    except QexpError as exc:  # from the lock (_run_job handles its own): the dir is not ours
        if hc.mode == RunMode.MULTIRUN:
            if isinstance(exc, RunDirHeld):
                record_held(run_dir, hc, str(exc))
            else:
                log.error("%s", exc)
            return None
        print(f"qexp: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def _run_job(cfg: DictConfig, run_dir: Path, hc: DictConfig) -> float | None:
    try:
        if hc.mode == RunMode.MULTIRUN:  # skip / resume / record failures per job
            metrics = run_sweep_job(cfg, run_dir, hc)
        else:
            metrics = run_training(cfg, run_dir)
    except QexpError as exc:
        mark_failed(run_dir, str(exc), config_fingerprint(cfg))
        if hc.mode == RunMode.MULTIRUN:
            log.error("%s", exc)
            return None
        print(f"qexp: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    return metrics.get("test_acc")
