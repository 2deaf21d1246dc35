"""Sweeps end to end: joblib and submitit launchers, skip / resume on re-run, failures, compare.

The sweeps run the real CLI in subprocesses on digits with a tiny MLP, so the whole file takes
well under two minutes on two cores.
"""

from __future__ import annotations

import csv
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import FAST, compose_config

from qexp.train.faults import FAULT_ENV
from qexp.train.job import plan_job
from qexp.train.sweep import MARKER, SUMMARY_FILE, available_cpus, launcher_threads

CONF = Path(__file__).resolve().parents[1] / "conf"
#: FAST but trainer.threads left unset: a sweep's jobs share the CPUs (launcher_threads)
BASE = [*(o for o in FAST if not o.startswith("trainer.threads=")), "model=mlp", "trainer.epochs=2"]
GRID = ["estimator=ste,clipped_ste", "bits=1,4", "seed=0,1"]
TIMEOUT = 240

# A run that dies like a SIGKILLed process right after its epoch-1 checkpoint and metrics.json
# ("running") are on disk (qexp/train/faults.py).
KILLED_IN_EPOCH_2 = {FAULT_ENV: "kill@epoch:1"}
# A crash (a non-QexpError exception) planted in every clipped_ste run as it starts.
CLIPPED_STE_CRASHES = {FAULT_ENV: "crash@start/clipped_ste-"}


def qexp(cwd: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run the CLI in ``cwd`` (with ``env`` added); returns the finished process."""
    head = [sys.executable, "-m", "qexp.cli"]
    env = {**os.environ, "HYDRA_FULL_ERROR": "1", **(env or {})}
    return subprocess.run(
        [*head, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )


def ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def run_dirs(sweep: Path) -> list[Path]:
    return sorted(p.parent for p in sweep.rglob("metrics.json"))


def metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def summary(sweep: Path) -> dict:
    return json.loads((sweep / SUMMARY_FILE).read_text())["counts"]


# -- helpers without training ---------------------------------------------------------------
def test_launcher_threads_share_the_cpus():
    joblib = "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"
    slurm = "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    basic = "hydra._internal.core_plugins.basic_launcher.BasicLauncher"
    assert launcher_threads({"_target_": joblib, "n_jobs": 2}, cpus=8) == 4
    assert launcher_threads({"_target_": joblib, "n_jobs": 3}, cpus=8) == 2
    assert launcher_threads({"_target_": joblib, "n_jobs": 4}, cpus=2) == 1
    assert launcher_threads({"_target_": joblib, "n_jobs": -1}, cpus=8) == 1
    assert launcher_threads({"_target_": joblib, "n_jobs": -2}, cpus=8) == 1  # 7 jobs
    assert launcher_threads({"_target_": slurm, "cpus_per_task": 6}, cpus=64) == 6
    assert launcher_threads({"_target_": slurm, "cpus_per_task": None}, cpus=64) is None
    assert launcher_threads({"_target_": basic}, cpus=8) is None


def test_plan_job(tmp_path):
    assert plan_job("abc", tmp_path) == "fresh"
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.pt").write_bytes(b"")
    assert plan_job("abc", tmp_path) == "resumed"
    (tmp_path / "metrics.json").write_text(json.dumps({"status": "running", "config_hash": "abc"}))
    assert plan_job("abc", tmp_path) == "resumed"
    (tmp_path / "metrics.json").write_text(
        json.dumps({"status": "completed", "config_hash": "abc"})
    )
    assert plan_job("abc", tmp_path) == "skipped"
    from qexp.errors import QexpError

    with pytest.raises(QexpError, match="different config"):
        plan_job("xyz", tmp_path)


def test_presets_compose():
    cfg = compose_config("+experiment=estimators_vs_bits", "hydra/launcher=slurm", with_hydra=True)
    local = compose_config("hydra/launcher=local", with_hydra=True)
    hc = cfg.hydra
    assert hc.sweep.dir == "multirun/estimators_vs_bits"
    assert hc.launcher._target_.endswith("SlurmLauncher")
    for key in ("partition", "gpus_per_node", "timeout_min", "array_parallelism", "mem_gb"):
        assert key in hc.launcher
    assert launcher_threads(hc.launcher) == hc.launcher.cpus_per_task
    assert local.hydra.launcher._target_.endswith("JoblibLauncher")
    # the preset lists only estimators that exist
    for name in str(hc.sweeper.params.estimator).split(","):
        assert (CONF / "estimator" / f"{name}.yaml").is_file(), name
    assert "32" not in str(hc.sweeper.params.bits).split(",")


# -- the joblib sweep: fresh, resumed, skipped ----------------------------------------------
@pytest.fixture(scope="module")
def joblib_sweep(tmp_path_factory):
    """A 2x2x2 sweep through joblib, one run of which had been killed in its second epoch."""
    cwd = tmp_path_factory.mktemp("joblib")
    sweep = cwd / "sweep"
    preset = ["+experiment=estimators_vs_bits", f"hydra.sweep.dir={sweep}"]
    # 1. the run ste / 1 bit / seed 0 dies after its epoch-1 checkpoint
    killed = qexp(
        cwd, "train", "-m", *preset, "estimator=ste", "bits=1", "seed=0", *BASE,
        env=KILLED_IN_EPOCH_2,
    )  # fmt: skip
    assert killed.returncode == 137, killed.stdout[-2000:] + killed.stderr[-2000:]
    (cut_off,) = run_dirs(sweep)
    cut_metrics = metrics(cut_off)
    # 2. the whole sweep: trainer.threads left unset, so each job gets cpus // n_jobs threads
    command = ["train", "-m", *preset, *GRID, *BASE]
    command += ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"]
    first = ok(qexp(cwd, *command))
    first_counts = summary(sweep)
    stamps = {d: (d / "metrics.json").stat().st_mtime_ns for d in run_dirs(sweep)}
    markers = {d: json.loads((d / MARKER).read_text()) for d in run_dirs(sweep)}
    events = sorted(sweep.rglob("events.out.tfevents.*"))
    # 3. the same command again
    second = ok(qexp(cwd, *command))
    return {
        "cwd": cwd,
        "sweep": sweep,
        "cut_off": cut_off,
        "cut_metrics": cut_metrics,
        "first": first,
        "first_counts": first_counts,
        "second": second,
        "second_counts": summary(sweep),
        "stamps": stamps,
        "markers": markers,
        "events": events,
    }


@pytest.mark.slow
def test_killed_run_left_a_checkpoint(joblib_sweep):
    m = joblib_sweep["cut_metrics"]
    assert m["status"] == "running" and m["epochs_done"] == 1
    assert joblib_sweep["cut_off"].name.startswith("bits=1,dataset=digits,estimator=ste,")


@pytest.mark.slow
def test_sweep_runs_every_job_and_resumes_the_cut_off_one(joblib_sweep):
    sweep = joblib_sweep["sweep"]
    dirs = run_dirs(sweep)
    assert len(dirs) == 8
    assert joblib_sweep["first_counts"] == {
        "fresh": 7,
        "resumed": 1,
        "skipped": 0,
        "held": 0,
        "failed": 0,
        "unfinished": 0,
    }
    assert "resumed        1" in joblib_sweep["first"]
    threads = max(1, available_cpus() // 2)
    for d in dirs:
        m = metrics(d)
        assert m["status"] == "completed" and m["epochs_done"] == 2, d
        assert joblib_sweep["markers"][d]["threads"] == threads
    cut_off = joblib_sweep["cut_off"]
    assert joblib_sweep["markers"][cut_off]["outcome"] == "resumed"
    assert "resumed" in (cut_off / "train.log").read_text()
    # epoch 1 comes from the killed process, epoch 2 from the resumed one
    history = metrics(cut_off)["history"]
    assert [h["epoch"] for h in history] == [1, 2]
    assert history[0] == joblib_sweep["cut_metrics"]["history"][0]


@pytest.mark.slow
def test_rerun_skips_every_completed_run(joblib_sweep):
    sweep = joblib_sweep["sweep"]
    assert joblib_sweep["second_counts"]["skipped"] == 8
    assert sum(joblib_sweep["second_counts"].values()) == 8
    assert "skipped        8" in joblib_sweep["second"]
    # nothing was trained: no metrics rewritten, no new event files
    for d, stamp in joblib_sweep["stamps"].items():
        assert (d / "metrics.json").stat().st_mtime_ns == stamp
    assert sorted(sweep.rglob("events.out.tfevents.*")) == joblib_sweep["events"]


@pytest.mark.slow
def test_compare_on_the_sweep(joblib_sweep):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cwd, sweep = joblib_sweep["cwd"], joblib_sweep["sweep"]
    half = sweep / "half-written"
    half.mkdir()
    (half / "metrics.json").write_text('{"status": "runn')
    out = cwd / "report"
    stdout = ok(qexp(cwd, "compare", str(sweep), "--out", str(out)))
    assert "skipped: 1 runs" in stdout and "not valid JSON" in stdout

    expected: dict[tuple[str, int], list[float]] = {}
    for d in run_dirs(sweep):
        if d == half:
            continue
        m = metrics(d)
        if m.get("status") == "completed":
            expected.setdefault((m["estimator"], m["w_bits"]), []).append(m["test_acc"])
    assert len(expected) == 4
    with (out / "compare.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4
    for row in rows:
        accs = expected[(row["estimator"], int(row["w_bits"]))]
        assert int(row["runs"]) == 2
        assert float(row["test_acc_mean"]) == pytest.approx(statistics.fmean(accs), abs=1e-12)
        assert float(row["test_acc_std"]) == pytest.approx(statistics.stdev(accs), abs=1e-12)
    assert "| ste |" in (out / "compare.md").read_text()
    assert (out / "accuracy_vs_bits.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    for estimator in ("ste", "clipped_ste"):
        acc = EventAccumulator(str(out / "tensorboard" / estimator))
        acc.Reload()
        points = {e.step: e.value for e in acc.Scalars("compare/test_acc")}
        assert sorted(points) == [1, 4]
        for bits, value in points.items():
            assert value == pytest.approx(statistics.fmean(expected[(estimator, bits)]), abs=1e-6)
        stds = {e.step: e.value for e in acc.Scalars("compare/test_acc_std")}
        assert stds[4] == pytest.approx(statistics.stdev(expected[(estimator, 4)]), abs=1e-6)


# -- failures and submitit ------------------------------------------------------------------
@pytest.mark.slow
def test_a_crashing_job_does_not_stop_the_sweep(tmp_path):
    sweep = tmp_path / "sweep"
    overrides = ["estimator=clipped_ste,ste", "bits=2", *FAST, "model=mlp", "trainer.epochs=1"]
    overrides += [f"hydra.sweep.dir={sweep}"]
    out = ok(qexp(tmp_path, "train", "-m", *overrides, env=CLIPPED_STE_CRASHES))
    by_estimator = {}
    for d in sweep.iterdir():
        if d.is_dir():
            by_estimator[d.name.split("-")[0]] = metrics(d)
    assert by_estimator["clipped_ste"]["status"] == "failed"
    assert by_estimator["clipped_ste"]["reason"].startswith("InjectedCrash: QEXP_FAULT=")
    assert by_estimator["ste"]["status"] == "completed"  # ran after the crash
    assert summary(sweep) == {
        "fresh": 1,
        "resumed": 0,
        "skipped": 0,
        "held": 0,
        "failed": 1,
        "unfinished": 0,
    }
    assert "InjectedCrash" in out


@pytest.mark.slow
def test_submitit_local_sweep(tmp_path):
    sweep = tmp_path / "sweep"
    overrides = ["estimator=ste", "bits=1,4", *FAST, "model=mlp", "trainer.epochs=1"]
    overrides += [f"hydra.sweep.dir={sweep}"]
    ok(qexp(tmp_path, "train", "-m", *overrides, "hydra/launcher=submitit_local"))
    dirs = run_dirs(sweep)
    assert len(dirs) == 2
    assert {metrics(d)["w_bits"] for d in dirs} == {1, 4}
    assert all(metrics(d)["status"] == "completed" for d in dirs)
    assert summary(sweep)["fresh"] == 2
