"""One writer per run dir: the lock itself, two `qexp train` at once, SIGKILL + resume, sweeps."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import FAST, read_metrics, run_qexp

from qexp import rundir_lock
from qexp.rundir_lock import LOCK_NAME, RunDirHeld, RunDirLock, machine_id, pid_start, read_lock
from qexp.train.faults import FAULT_ENV, GO_ENV


def write_lock(run_dir: Path, age_s: float = 0.0, **fields) -> Path:
    """A lock file as another process would leave it, last touched ``age_s`` seconds ago."""
    run_dir.mkdir(parents=True, exist_ok=True)
    holder = {
        "token": "someone-else",
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "machine": machine_id(),
        "pid_start": pid_start(os.getpid()),
        "started_at": time.time() - age_s,
        **fields,
    }
    path = run_dir / LOCK_NAME
    path.write_text(json.dumps(holder))
    os.utime(path, (time.time() - age_s, time.time() - age_s))
    return path


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def wait_for(predicate, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.02)


# -- the lock -------------------------------------------------------------------------------
def test_lock_names_its_holder_and_is_gone_after_release(tmp_path):
    with RunDirLock(tmp_path / "run") as lock:
        holder, _ = read_lock(tmp_path / "run" / LOCK_NAME)
        assert holder.pid == os.getpid() and holder.host == socket.gethostname()
        with pytest.raises(RunDirHeld) as info:
            RunDirLock(tmp_path / "run").acquire()
        message = str(info.value)
        assert f"pid {os.getpid()} on {socket.gethostname()}" in message
        assert "running since" in message and f"kill {os.getpid()}" in message
        assert lock.owned()
    assert not (tmp_path / "run" / LOCK_NAME).exists()


def test_a_run_dir_that_cannot_be_created_is_one_line(tmp_path):
    from qexp.errors import QexpError

    (tmp_path / "file").write_text("")
    with pytest.raises(QexpError, match="cannot lock run dir .*writable hydra.run.dir"):
        RunDirLock(tmp_path / "file").acquire()


def test_lock_of_a_dead_process_on_this_machine_is_taken_over(tmp_path):
    pid = dead_pid()
    write_lock(tmp_path, pid=pid, pid_start=None)
    with RunDirLock(tmp_path) as lock:
        assert read_lock(tmp_path / LOCK_NAME)[0].token == lock.holder.token
        assert lock.took_over.startswith(f"pid {pid} on ")


def test_reused_pid_does_not_keep_a_lock_alive(tmp_path):
    # our own (live) pid, but with another start time: the process that wrote it is gone
    write_lock(tmp_path, pid_start="1")
    with RunDirLock(tmp_path) as lock:
        assert lock.owned()


def test_other_machine_is_judged_by_heartbeat_age(tmp_path):
    other = {"host": "node42", "machine": "node42|boot|pid:[1]", "pid": 4242}
    write_lock(tmp_path, age_s=5, **other)
    with pytest.raises(RunDirHeld, match="pid 4242 on node42.*last heartbeat") as info:
        RunDirLock(tmp_path, stale_s=60).acquire()
    assert "taken over" in str(info.value)
    write_lock(tmp_path, age_s=61, **other)
    with RunDirLock(tmp_path, stale_s=60) as lock:
        assert lock.owned()


def test_unreadable_lock_is_respected_while_fresh(tmp_path, monkeypatch):
    monkeypatch.setattr(rundir_lock, "_WRITING_GRACE_S", 0.1)
    (tmp_path / LOCK_NAME).write_text("")
    with pytest.raises(RunDirHeld, match="unreadable"):
        RunDirLock(tmp_path, stale_s=60).acquire()
    os.utime(tmp_path / LOCK_NAME, (time.time() - 61, time.time() - 61))
    with RunDirLock(tmp_path, stale_s=60) as lock:
        assert lock.owned()


def test_heartbeat_touches_the_lock_and_notices_a_takeover(tmp_path):
    lock = RunDirLock(tmp_path, heartbeat_s=0.02).acquire()
    try:
        path = tmp_path / LOCK_NAME
        os.utime(path, (1.0, 1.0))
        wait_for(lambda: path.stat().st_mtime > 1.0, "a heartbeat")
        write_lock(tmp_path)  # someone else's lock now
        wait_for(lambda: lock.lost, "the lost lock to be noticed")
    finally:
        lock.release()
    assert read_lock(tmp_path / LOCK_NAME)[0].token == "someone-else"  # not deleted by us


def race(locks: list[RunDirLock]) -> list[object]:
    """Every lock tries to acquire at the same moment; each one's lock or RunDirHeld."""
    outcomes: list[object] = []
    barrier = threading.Barrier(len(locks))

    def take(lock: RunDirLock) -> None:
        barrier.wait()
        try:
            outcomes.append(lock.acquire())
        except RunDirHeld as exc:
            outcomes.append(exc)

    threads = [threading.Thread(target=take, args=(lock,)) for lock in locks]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return outcomes


def test_only_one_of_many_racing_processes_takes_over_a_stale_lock(tmp_path):
    for _ in range(5):
        write_lock(tmp_path, age_s=100, host="gone", machine="gone|x|y")
        outcomes = race([RunDirLock(tmp_path, stale_s=10) for _ in range(6)])
        winners = [o for o in outcomes if isinstance(o, RunDirLock)]
        assert len(winners) == 1, outcomes
        assert winners[0].owned()
        winners[0].release()
        assert not (tmp_path / (LOCK_NAME + ".break")).exists()


# -- through the CLI ------------------------------------------------------------------------
# Runs stop after epoch 1 (its checkpoint on disk) and wait there until the file
# $QEXP_FAULT_GO exists; they write $QEXP_FAULT_GO.paused when they stop (qexp/train/faults.py).
ARGS = [*FAST, "model=mlp", "trainer.epochs=2"]


def start_paused(tmp_path: Path, *args: str) -> tuple[subprocess.Popen, Path]:
    """Start `qexp ARGS` paused in epoch 2; returns the process and its go file."""
    go = tmp_path / "go"
    env = {**os.environ, GO_ENV: str(go), FAULT_ENV: "pause@epoch:1"}
    command = [sys.executable, "-m", "qexp.cli", *args]
    proc = subprocess.Popen(
        command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    paused = Path(str(go) + ".paused")
    wait_for(lambda: paused.exists() or proc.poll() is not None, "the run to pause", 240)
    assert proc.poll() is None, proc.communicate()[0][-3000:]
    return proc, go


def snapshot(run_dir: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(run_dir)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in run_dir.rglob("*")
        if p.is_file() and p.name != LOCK_NAME  # the heartbeat touches the lock
    }


def finish(proc: subprocess.Popen, go: Path) -> str:
    go.write_text("")
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, out[-3000:]
    return out


@pytest.mark.slow
def test_second_train_in_a_held_run_dir_is_refused(tmp_path):
    run_dir = tmp_path / "run"
    first, go = start_paused(tmp_path, "train", *ARGS, f"hydra.run.dir={run_dir}")
    try:
        before = snapshot(run_dir)
        second = run_qexp("train", *ARGS, f"hydra.run.dir={run_dir}", cwd=tmp_path, check=False)
        assert second.returncode == 2
        err = second.stderr.strip()
        assert len(err.splitlines()) == 1, err
        assert f"pid {first.pid} on {socket.gethostname()} (running since" in err
        assert f"kill {first.pid}" in err and "Traceback" not in second.stderr
        assert snapshot(run_dir) == before  # not even Hydra's files were touched
    finally:
        finish(first, go)
    m = read_metrics(run_dir)
    assert m["status"] == "completed" and [h["epoch"] for h in m["history"]] == [1, 2]
    events = list(run_dir.glob("events.out.tfevents.*"))
    assert events and all(f".{first.pid}." in e.name for e in events)
    assert not (run_dir / LOCK_NAME).exists()


@pytest.mark.slow
def test_resume_takes_over_the_lock_of_a_killed_run(tmp_path):
    run_dir = tmp_path / "run"
    first, _ = start_paused(tmp_path, "train", *ARGS, f"hydra.run.dir={run_dir}")
    os.kill(first.pid, signal.SIGKILL)
    first.communicate()
    assert read_lock(run_dir / LOCK_NAME)[0].pid == first.pid  # left behind
    run_qexp("train", *ARGS, "resume=true", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    m = read_metrics(run_dir)
    assert m["status"] == "completed" and [h["epoch"] for h in m["history"]] == [1, 2]
    log = (run_dir / "train.log").read_text()
    assert f"took over the stale lock of pid {first.pid}" in log and "resumed" in log
    assert not (run_dir / LOCK_NAME).exists()


@pytest.mark.slow
def test_sweep_rerun_skips_a_job_held_by_a_running_one(tmp_path):
    # sweep 1 pauses in its first job; the same sweep run again meanwhile must leave that job
    # alone, train the other one, and not relabel sweep 1's jobs as its own
    sweep = tmp_path / "sweep"
    command = ["train", "-m", *ARGS, "estimator=ste", "bits=1,2", f"hydra.sweep.dir={sweep}"]
    first, go = start_paused(tmp_path, *command)
    try:
        (held_dir,) = [p for p in sweep.iterdir() if p.is_dir()]
        before = {k: v for k, v in snapshot(held_dir).items() if not k.startswith(".hydra")}
        rerun = run_qexp(*command, cwd=tmp_path).stdout
        assert "held           1" in rerun and "completed      1" in rerun
        assert f"held: {held_dir.name}: run dir {held_dir} is in use by pid {first.pid}" in rerun
        counts = json.loads((sweep / "sweep_summary.json").read_text())["counts"]
        assert counts["held"] == 1 and counts["fresh"] == 1
        # qexp wrote nothing there (Hydra rewrote .hydra/ and appended to train.log: README)
        after = {k: v for k, v in snapshot(held_dir).items() if not k.startswith(".hydra")}
        after.pop("train.log"), before.pop("train.log")
        assert after == before
    finally:
        out = finish(first, go)
    # sweep 1 finishes its first job and finds its second one completed by the re-run
    assert "2 jobs" in out and "completed      1" in out and "skipped        1" in out
    assert read_metrics(held_dir)["status"] == "completed"
    assert json.loads((held_dir / "sweep_job.json").read_text())["outcome"] == "fresh"


# -- launcher options -----------------------------------------------------------------------
@pytest.mark.parametrize(
    "overrides, named",
    [
        (["hydra/launcher=local", "hydra.launcher.n_jobs=0"], "hydra.launcher.n_jobs=0"),
        (["hydra/launcher=local", "hydra.launcher.timeout=-1"], "hydra.launcher.timeout"),
        (["hydra/launcher=slurm", "hydra.launcher.timeout_min=0"], "hydra.launcher.timeout_min"),
        (["hydra/launcher=slurm", "hydra.launcher.cpus_per_task=0"], "cpus_per_task"),
        (["hydra/launcher=slurm", "hydra.launcher.tasks_per_node=4"], "tasks_per_node"),
        (["hydra/launcher=submitit_local", "hydra.launcher.nodes=2"], "hydra.launcher.nodes"),
        (["hydra/launcher=local", "hydra.launcher.n_jobs=two"], "hydra.launcher.n_jobs"),
        (["hydra.launcher.n_jobs=2"], "pick the launcher first"),
    ],
)
def test_bad_launcher_options_are_refused_in_preflight(overrides, named):
    from qexp.config.schema import register_schemas
    from qexp.errors import QexpError
    from qexp.train.preflight import check_command_line

    register_schemas()
    with pytest.raises(QexpError, match=named.replace(".", r"\.")) as info:
        check_command_line(["-m", "dataset=digits", "bits=1,2", *overrides])
    assert "\n" not in str(info.value)


@pytest.mark.slow
def test_bad_launcher_option_stops_the_sweep_before_any_job(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_qexp("train", "-m", *ARGS, "bits=1,2", "hydra/launcher=local",
                    "hydra.launcher.n_jobs=0", f"hydra.sweep.dir={sweep}", cwd=tmp_path,
                    check=False)  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("qexp: error: hydra.launcher.n_jobs=0 is not allowed")
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not sweep.exists()
