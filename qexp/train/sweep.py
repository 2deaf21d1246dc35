"""Sweep jobs that can be re-run: skip finished runs, resume cut-off ones, summarise the sweep.

Every job of a multirun (`qexp train -m ...`) goes through :func:`run_sweep_job` instead of
calling ``run_training`` directly. It decides what the job has to do from what its run dir
already holds:

* ``metrics.json`` says ``completed...`` with the job's own config hash -> **skipped** (no work);
* ``checkpoints/last.pt`` exists -> **resumed** (same path as ``resume=true``);
* otherwise -> **fresh**;
* another live process holds the run dir's lock (qexp/rundir_lock.py) -> **held**: the job
  touches nothing there and records itself under ``<sweep dir>/.qexp_held/`` instead.

Each job leaves a small marker (:data:`MARKER`) in its run dir saying what it did. Jobs may run
in other processes or on other machines (joblib, submitit), so the end-of-sweep summary
(:class:`SweepSummary`, a Hydra callback registered in conf/config.yaml) reads those markers
from disk instead of collecting return values. A sweep id file written at the start of the
sweep tells this sweep's markers apart from those left by earlier invocations in the same dir.
"""

from __future__ import annotations

import logging
import os
import time
import traceback
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, open_dict

from qexp.errors import QexpError
from qexp.record import config_fingerprint, mark_failed, read_json, read_record, write_json
from qexp.train.gpu_assign import sweep_job_device, visible_gpu_count
from qexp.train.run import run_training

log = logging.getLogger("qexp")

#: per-job marker written into the run dir: what the job did (fresh / resumed / skipped / failed)
MARKER = "sweep_job.json"
#: written into the sweep dir when a sweep starts; jobs copy its id into their marker
SWEEP_ID_FILE = ".qexp_sweep.json"
#: the sweep id again, in the environment the jobs inherit (joblib workers, submitit jobs): a
#: second sweep started in the same dir rewrites SWEEP_ID_FILE, and must not relabel our jobs
SWEEP_ID_ENV = "QEXP_SWEEP_ID"
#: the end-of-sweep summary, written into the sweep dir as well as printed
SUMMARY_FILE = "sweep_summary.json"
#: in the sweep dir: one record per job that found its run dir held by another live process
HELD_DIR = ".qexp_held"

OUTCOMES = ("fresh", "resumed", "skipped", "held", "failed")


# -- threads ---------------------------------------------------------------------------------
def available_cpus() -> int:
    """CPUs this process may run on (respects affinity masks, e.g. Slurm's or taskset's)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def _joblib_workers(n_jobs: Any, cpus: int) -> int:
    """Concurrent jobs of joblib's ``n_jobs`` (negative values count back from the CPU count)."""
    try:
        n = int(n_jobs)
    except (TypeError, ValueError):
        return cpus
    if n < 0:
        n = cpus + 1 + n  # joblib: -1 = all CPUs, -2 = all but one...
    return max(1, min(n, cpus)) if n >= 1 else 1


def launcher_threads(launcher: Mapping[str, Any] | None, cpus: int | None = None) -> int | None:
    """torch threads per job so that the jobs a launcher runs at once share the CPUs.

    joblib runs ``n_jobs`` jobs side by side on this machine: each gets
    ``max(1, cpus // n_jobs)``. A submitit job owns its ``cpus_per_task``. Any other launcher
    (Hydra's basic one runs jobs one after another) keeps torch's default: None.
    """
    if not launcher:
        return None
    cpus = available_cpus() if cpus is None else cpus
    target = str(launcher.get("_target_", "")).lower()
    if "joblib" in target:
        return max(1, cpus // _joblib_workers(launcher.get("n_jobs", -1), cpus))
    if "submitit" in target:
        per_task = launcher.get("cpus_per_task")
        return int(per_task) if per_task else None
    return None


# -- reading run dirs ----------------------------------------------------------------------
def _sweep_dir(hc: Any) -> Path:
    """The sweep dir as an absolute path (relative ones are relative to the launch dir)."""
    path = Path(str(hc.sweep.dir))
    return path if path.is_absolute() else Path(str(hc.runtime.cwd)) / path


def _one_line(exc: BaseException, limit: int = 300) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text[:limit]


def current_sweep_id(hc: Any) -> str | None:
    """The id of the sweep this job belongs to."""
    if os.environ.get(SWEEP_ID_ENV):
        return os.environ[SWEEP_ID_ENV]
    return (read_json(_sweep_dir(hc) / SWEEP_ID_FILE) or {}).get("id")


# -- the job side ---------------------------------------------------------------------------
def plan_job(fingerprint: str, run_dir: Path) -> str:
    """What a sweep job must do in ``run_dir``: "skipped", "resumed" or "fresh".

    Raises QexpError when the dir already holds a run of another config: training over it
    would destroy those results, and resuming it would mix two configs.
    """
    record = read_record(run_dir)
    old_hash = record.config_hash if record else None
    if old_hash is not None and old_hash != fingerprint:
        raise QexpError(
            f"{run_dir} already holds a run with a different config (config_hash {old_hash}, "
            f"this job {fingerprint}): point hydra.sweep.dir at a new folder, or delete that "
            "run dir"
        )
    if record is not None and record.completed:
        return "skipped"
    if (run_dir / "checkpoints" / "last.pt").is_file():
        return "resumed"
    return "fresh"


class _Marker:
    """The job's marker file: written when the job starts and again when it ends."""

    def __init__(self, run_dir: Path, hc: Any) -> None:
        self.path = run_dir / MARKER
        self.data: dict[str, Any] = {
            "sweep_id": current_sweep_id(hc),
            "job_num": int(hc.job.num) if hc.job.get("num") is not None else None,
            "overrides": list(hc.overrides.task),
            "outcome": "running",
            "started_at": time.time(),
        }

    def write(self, **fields: Any) -> None:
        self.data.update(fields)
        try:
            write_json(self.data, self.path)
        except OSError as exc:  # a marker must never fail the job it describes
            log.warning("could not write %s: %s", self.path, exc)


def run_sweep_job(cfg: DictConfig, run_dir: Path, hc: Any) -> dict[str, Any]:
    """Run one job of a multirun: skip, resume or train it, and leave its marker.

    Returns the run's metrics. A QexpError is re-raised (after recording it) for the caller's
    usual handling; any other exception is recorded in metrics.json as ``failed: ...`` and
    turned into a QexpError, so one broken job never stops the others.
    """
    marker = _Marker(run_dir, hc)
    planned = None
    try:
        fingerprint = config_fingerprint(cfg)
        marker.data["config_hash"] = fingerprint
        planned = plan_job(fingerprint, run_dir)
        if planned == "skipped":
            record = read_record(run_dir)
            metrics = record.to_json() if record else {}
            log.info("%s: already completed with this config, skipping", run_dir)
            marker.write(outcome="skipped", status=metrics.get("status"), ended_at=time.time())
            return metrics
        with open_dict(cfg):
            if planned == "resumed":
                cfg.resume = True
            if cfg.trainer.threads is None:
                # several jobs share this machine: split its CPUs instead of oversubscribing
                cfg.trainer.threads = launcher_threads(hc.get("launcher"))
            cfg.trainer.device = sweep_job_device(
                cfg.trainer.device, hc.get("launcher"), hc.job.get("num"), visible_gpu_count()
            )
        marker.write(planned=planned, threads=cfg.trainer.threads, device=cfg.trainer.device)
        metrics = run_training(cfg, run_dir)
    except QexpError as exc:
        if planned is not None:  # a failure inside training, not a refusal to touch the dir
            mark_failed(run_dir, str(exc)[:300], marker.data.get("config_hash"))
        marker.write(outcome="failed", error=str(exc), ended_at=time.time())
        raise
    except Exception as exc:
        log.exception("job in %s failed", run_dir)
        error = _one_line(exc)
        mark_failed(run_dir, error, marker.data.get("config_hash"))
        marker.write(
            outcome="failed",
            error=error,
            traceback=traceback.format_exc(limit=20),
            ended_at=time.time(),
        )
        raise QexpError(f"{run_dir}: {error}") from exc
    status = str(metrics.get("status", ""))
    outcome = planned if status == "completed" else "failed"
    marker.write(
        outcome=outcome,
        status=status,
        error=None if outcome != "failed" else metrics.get("reason") or status,
        ended_at=time.time(),
    )
    return metrics


def record_held(run_dir: Path, hc: Any, reason: str) -> None:
    """Record a job whose run dir another live process holds (in the sweep dir, not the run
    dir: that one has a writer already)."""
    log.warning("%s", reason)
    sweep_dir = _sweep_dir(hc)
    sweep_id = current_sweep_id(hc)
    job_num = int(hc.job.num) if hc.job.get("num") is not None else 0
    record = {
        "sweep_id": sweep_id,
        "run_dir": str(run_dir),
        "overrides": list(hc.overrides.task),
        "outcome": "held",
        "error": reason,
        "ended_at": time.time(),
    }
    try:
        write_json(record, sweep_dir / HELD_DIR / f"{sweep_id}-{job_num}.json")
    except OSError as exc:
        log.warning("could not record the held job %s: %s", run_dir, exc)


def collect_held(sweep_dir: Path, sweep_id: str | None) -> list[tuple[Path, dict[str, Any]]]:
    """(run dir, record) of every job of sweep ``sweep_id`` that found its run dir held."""
    found = []
    for path in sorted((sweep_dir / HELD_DIR).glob("*.json")):
        data = read_json(path)
        if data is not None and (sweep_id is None or data.get("sweep_id") == sweep_id):
            found.append((Path(str(data.get("run_dir"))), data))
    return found


# -- the sweep side -------------------------------------------------------------------------
def collect_markers(sweep_dir: Path, sweep_id: str | None) -> list[tuple[Path, dict[str, Any]]]:
    """(run dir, marker) of every job of sweep ``sweep_id`` under ``sweep_dir``."""
    found = []
    for path in sorted(sweep_dir.rglob(MARKER)):
        data = read_json(path)
        if data is not None and (sweep_id is None or data.get("sweep_id") == sweep_id):
            found.append((path.parent, data))
    return found


def summarize(sweep_dir: Path, sweep_id: str | None) -> dict[str, Any]:
    """Counts per outcome plus the runs that failed or never finished."""
    markers = collect_markers(sweep_dir, sweep_id) + collect_held(sweep_dir, sweep_id)
    counts = dict.fromkeys((*OUTCOMES, "unfinished"), 0)
    problems = []
    for run_dir, data in markers:
        outcome = data.get("outcome")
        key = outcome if outcome in counts else "unfinished"
        counts[key] += 1
        if key in ("failed", "unfinished", "held"):
            rel = os.path.relpath(run_dir, sweep_dir)
            problems.append({"run_dir": rel, "outcome": key, "error": data.get("error")})
    return {
        "sweep_dir": str(sweep_dir),
        "sweep_id": sweep_id,
        "jobs": len(markers),
        "counts": counts,
        "problems": problems,
    }


def format_summary(summary: dict[str, Any]) -> str:
    """The summary as a few lines of text."""
    c = summary["counts"]
    lines = [
        f"qexp sweep summary: {summary['jobs']} jobs in {summary['sweep_dir']}",
        f"  completed   {c['fresh']:4d}   trained from scratch",
        f"  resumed     {c['resumed']:4d}   continued from checkpoints/last.pt and completed",
        f"  skipped     {c['skipped']:4d}   already completed with the same config",
        f"  held        {c['held']:4d}   run dir in use by another live process: not touched",
        f"  failed      {c['failed']:4d}",
    ]
    if c["unfinished"]:
        lines.append(f"  unfinished  {c['unfinished']:4d}   started but never reported back")
    for p in summary["problems"]:
        lines.append(f"  {p['outcome']}: {p['run_dir']}: {p['error'] or 'no error recorded'}")
    return "\n".join(lines)


class SweepSummary(Callback):
    """Hydra callback: tags the sweep's jobs with an id and summarises them at the end."""

    def __init__(self) -> None:
        self.sweep_id: str | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.sweep_id = uuid.uuid4().hex
        os.environ[SWEEP_ID_ENV] = self.sweep_id
        sweep_dir = _sweep_dir(config.hydra)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        write_json({"id": self.sweep_id, "started_at": time.time()}, sweep_dir / SWEEP_ID_FILE)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = _sweep_dir(config.hydra)
        summary = summarize(sweep_dir, self.sweep_id)
        try:
            write_json(summary, sweep_dir / SUMMARY_FILE)
        except OSError as exc:
            log.warning("could not write the sweep summary: %s", exc)
        print(format_summary(summary), flush=True)
