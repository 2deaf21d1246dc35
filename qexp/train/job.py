"""The life of one run job, written once: lock -> completed? skip : cut off? resume : fresh ->
train -> record the outcome.

`qexp train` (a single run or each job of a sweep), a study's runs and the full-precision
partner cache all go through :func:`run_job`. What the job does follows from what its run dir
already holds and from its :class:`Policy`:

* ``AUTO`` (sweeps, studies, the partner cache): ``metrics.json`` says completed with the job's
  own config fingerprint -> **skipped**; ``checkpoints/last.pt`` exists -> **resumed**;
  otherwise **fresh**;
* ``FRESH`` (a `qexp train` without ``resume=true``, a tuning trial): trained from scratch;
* a dir holding a run of another config is refused with one line (training over it would
  destroy those results, resuming it would mix two configs).

The run dir is locked for the whole job (qexp.rundir_lock): another live process holding it
raises :class:`~qexp.rundir_lock.RunDirHeld` before anything is touched. A failure while
training is recorded in ``metrics.json`` (failed, with a one-line reason) and re-raised. The
fault-injection point ``start`` (qexp.train.faults) sits right after the lock.
"""

from __future__ import annotations

import contextlib
import enum
import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qexp.errors import QexpError
from qexp.record import atomic_write, mark_failed, read_record
from qexp.rundir_lock import hold_run_dir
from qexp.spec import RunSpec
from qexp.train.faults import fault_point

log = logging.getLogger("qexp")

#: trains a run (spec) in a run dir and returns its metrics (qexp.train.run.train_run)
TrainFn = Callable[[RunSpec, Path], dict[str, Any]]
#: the run's resolved config beside it, as Hydra's runs have it (standalone jobs write it)
CONFIG_FILE = Path(".hydra") / "config.yaml"


class Policy(enum.Enum):
    """What a job does with a run dir that already holds (part of) its run."""

    AUTO = "auto"  # skip a completed run, resume a cut-off one
    FRESH = "fresh"  # train from scratch


class Outcome(str, enum.Enum):
    """What a job did."""

    FRESH = "fresh"
    RESUMED = "resumed"
    SKIPPED = "skipped"
    FAILED = "failed"


@dataclass
class JobResult:
    """The outcome of a job, the run's metrics (``metrics.json``) and the planned action."""

    outcome: Outcome
    planned: Outcome
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def reason(self) -> str | None:
        """Why the run failed (or a caveat on a completed one)."""
        return self.metrics.get("reason")


def plan_job(fingerprint: str, run_dir: Path, policy: Policy = Policy.AUTO) -> Outcome:
    """What a job must do in ``run_dir``: skipped, resumed or fresh.

    Raises QexpError when the dir holds a run of another config and the job would build on it.
    """
    if policy is Policy.FRESH:
        return Outcome.FRESH
    record = read_record(run_dir)
    old_hash = record.config_hash if record else None
    if old_hash is not None and old_hash != fingerprint:
        raise QexpError(
            f"{run_dir} already holds a run with a different config (config_hash {old_hash}, "
            f"this job {fingerprint}): point the run at a new folder, or delete that run dir"
        )
    if record is not None and record.completed:
        return Outcome.SKIPPED
    if (run_dir / "checkpoints" / "last.pt").is_file():
        return Outcome.RESUMED
    return Outcome.FRESH


def run_job(
    spec: RunSpec,
    run_dir: Path,
    train: TrainFn,
    policy: Policy = Policy.AUTO,
    standalone: bool = False,
    on_plan: Callable[[Outcome], None] | None = None,
) -> JobResult:
    """Run the job of ``spec`` in ``run_dir`` with ``train``.

    ``standalone``: the job runs outside a Hydra app (a study's run, the partner cache), so it
    writes the run's resolved config to ``.hydra/config.yaml`` and its log to ``train.log``
    itself. ``on_plan`` hears the planned action before training starts (a sweep's marker).
    """
    run_dir = Path(run_dir)
    with hold_run_dir(run_dir), _run_log(run_dir, standalone):
        planned = plan_job(spec.fingerprint, run_dir, policy)
        if on_plan is not None:
            on_plan(planned)
        if planned is Outcome.SKIPPED:
            record = read_record(run_dir)
            log.info("%s: already completed with this config, skipping", run_dir)
            return JobResult(Outcome.SKIPPED, planned, record.to_json() if record else {})
        if standalone:
            write_config(spec.config, run_dir)
        try:
            fault_point("start", run_dir)
            metrics = train(spec.with_runtime(resume=planned is Outcome.RESUMED), run_dir)
        except Exception as exc:
            mark_failed(run_dir, one_line(exc), spec.fingerprint)
            raise
    outcome = planned if metrics.get("status") == "completed" else Outcome.FAILED
    return JobResult(outcome, planned, metrics)


def write_config(config: dict[str, Any], run_dir: Path) -> None:
    """The run's resolved config as ``.hydra/config.yaml`` (JSON is valid YAML)."""
    text = (json.dumps(config, indent=2) + "\n").encode()
    atomic_write(run_dir / CONFIG_FILE, lambda f: f.write(text))


def one_line(exc: BaseException, limit: int = 300) -> str:
    """An exception as one line: QexpError's own words, else ``Type: first line``."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if isinstance(exc, QexpError):
        return text[:limit]
    return (f"{type(exc).__name__}: {text}" if text else type(exc).__name__)[:limit]


@contextlib.contextmanager
def _run_log(run_dir: Path, standalone: bool) -> Iterator[None]:
    """For standalone jobs, the qexp logger's records also go to ``run_dir/train.log``."""
    if not standalone:
        yield
        return
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
