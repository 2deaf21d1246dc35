"""Sweep jobs that can be re-run: skip finished runs, resume cut-off ones, summarise the sweep.

Every job of a multirun (`qexp train -m ...`) goes through :func:`run_sweep_job`, which gives
it its share of the machine (CPU threads, a GPU) and leaves a marker of what it did:

* the job lifecycle (qexp/train/job.py) skips a run completed with the job's own config,
  resumes a cut-off one, trains a fresh one;
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
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from qexp.errors import QexpError
from qexp.record import read_json, write_json
from qexp.rundir_lock import RunDirHeld
from qexp.spec import RunSpec
from qexp.train.gpu_assign import sweep_job_device, visible_gpu_count
from qexp.train.job import Outcome, Policy, one_line, run_job
from qexp.train.run import train_run

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
def sweep_dir_of(hc: Any) -> Path:
    """The sweep dir as an absolute path (relative ones are relative to the launch dir)."""
    path = Path(str(hc.sweep.dir))
    return path if path.is_absolute() else Path(str(hc.runtime.cwd)) / path


def current_sweep_id(hc: Any) -> str | None:
    """The id of the sweep this job belongs to."""
    if os.environ.get(SWEEP_ID_ENV):
        return os.environ[SWEEP_ID_ENV]
    return (read_json(sweep_dir_of(hc) / SWEEP_ID_FILE) or {}).get("id")


# -- the job side ---------------------------------------------------------------------------
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


def run_sweep_job(spec: RunSpec, run_dir: Path, hc: Any) -> dict[str, Any]:
    """Run one job of a multirun through the job lifecycle (skip, resume or train it) with
    its share of the CPUs and its GPU, and leave its marker.

    Returns the run's metrics. A QexpError is re-raised (after recording it) for the caller's
    usual handling; any other exception is recorded and turned into a QexpError, so one broken
    job never stops the others.
    """
    marker = _Marker(run_dir, hc)
    marker.data["config_hash"] = spec.fingerprint
    launcher = hc.get("launcher")
    # several jobs share this machine: split its CPUs instead of oversubscribing
    threads = spec.trainer.threads
    if threads is None:
        threads = launcher_threads(launcher)
    device = sweep_job_device(
        spec.trainer.device, launcher, hc.job.get("num"), visible_gpu_count()
    )
    spec = spec.with_runtime(threads=threads, device=device)

    def on_plan(planned: Outcome) -> None:
        marker.write(planned=planned.value, threads=threads, device=device)

    try:
        result = run_job(spec, run_dir, train_run, Policy.AUTO, on_plan=on_plan)
    except RunDirHeld:
        raise
    except QexpError as exc:
        marker.write(outcome="failed", error=str(exc), ended_at=time.time())
        raise
    except Exception as exc:
        log.exception("job in %s failed", run_dir)
        error = one_line(exc)
        marker.write(
            outcome="failed",
            error=error,
            traceback=traceback.format_exc(limit=20),
            ended_at=time.time(),
        )
        raise QexpError(f"{run_dir}: {error}") from exc
    status = result.metrics.get("status")
    failed = result.outcome is Outcome.FAILED
    marker.write(
        outcome=result.outcome.value,
        status=status,
        error=(result.reason or status) if failed else None,
        ended_at=time.time(),
    )
    return result.metrics


def record_held(run_dir: Path, hc: Any, reason: str) -> None:
    """Record a job whose run dir another live process holds (in the sweep dir, not the run
    dir: that one has a writer already)."""
    log.warning("%s", reason)
    sweep_dir = sweep_dir_of(hc)
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
