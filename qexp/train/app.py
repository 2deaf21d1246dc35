"""`qexp train`: the Hydra application behind the command, and its Hydra callbacks.

Each job (the single run, or each point of a sweep) reads its composed config into a
:class:`~qexp.spec.RunSpec` (qexp.train.run) and goes through the job lifecycle
(qexp.train.job); sweep jobs through qexp.train.sweep, which adds their share of the machine
and a marker for the end-of-sweep summary.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from qexp.config.schema import register_schemas
from qexp.errors import QexpError
from qexp.record import write_json
from qexp.rundir_lock import RunDirHeld, not_first_rank, take_run_dir
from qexp.train.job import Policy, run_job
from qexp.train.run import run_spec, train_run
from qexp.train.sweep import (
    SUMMARY_FILE,
    SWEEP_ID_ENV,
    SWEEP_ID_FILE,
    format_summary,
    record_held,
    run_sweep_job,
    summarize,
    sweep_dir_of,
)

log = logging.getLogger("qexp")

# Jobs may run in fresh processes (joblib, submitit) that import only this module.
register_schemas()


@hydra.main(version_base=None, config_path="pkg://qexp.conf", config_name="config")
def hydra_main(cfg: DictConfig) -> float | None:
    """Run one job; in a sweep a failed job is recorded and the sweep goes on."""
    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    multirun = hc.mode == RunMode.MULTIRUN
    try:
        spec = run_spec(cfg)
        if multirun:
            metrics = run_sweep_job(spec, run_dir, hc)
        else:  # resume=true: skip a completed run, resume a cut-off one
            policy = Policy.AUTO if spec.resume else Policy.FRESH
            metrics = run_job(spec, run_dir, train_run, policy).metrics
    except RunDirHeld as exc:  # the dir is not ours: nothing was touched there
        if multirun:
            record_held(run_dir, hc, str(exc))
            return None
        _exit_with(exc)
    except QexpError as exc:
        if multirun:
            log.error("%s", exc)
            return None
        _exit_with(exc)
    return metrics.get("test_acc")


def _exit_with(exc: QexpError) -> None:
    print(f"qexp: error: {exc}", file=sys.stderr)
    raise SystemExit(2) from None


class LockRunDir(Callback):
    """Hydra callback: locks a single run's dir before Hydra writes into it (.hydra/, train.log).

    A sweep job's dir is known only inside the job, after Hydra has written its files there;
    sweep jobs are locked by the job lifecycle (qexp.train.job).
    """

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        run_dir = os.path.abspath(str(OmegaConf.select(config, "hydra.run.dir")))
        if not_first_rank():
            return
        try:
            take_run_dir(run_dir)
        except QexpError as exc:
            _exit_with(exc)


class SweepSummary(Callback):
    """Hydra callback: tags the sweep's jobs with an id and summarises them at the end."""

    def __init__(self) -> None:
        self.sweep_id: str | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.sweep_id = uuid.uuid4().hex
        os.environ[SWEEP_ID_ENV] = self.sweep_id
        sweep_dir = sweep_dir_of(config.hydra)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        write_json({"id": self.sweep_id, "started_at": time.time()}, sweep_dir / SWEEP_ID_FILE)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = sweep_dir_of(config.hydra)
        summary = summarize(sweep_dir, self.sweep_id)
        try:
            write_json(summary, sweep_dir / SUMMARY_FILE)
        except OSError as exc:
            log.warning("could not write the sweep summary: %s", exc)
        print(format_summary(summary), flush=True)
