"""Run a study's runs on workers: in this process, in local worker processes side by side, or
as a Slurm job array (submitit).

A stage hands a batch of independent :class:`Task` s to a pool and gets one :class:`Result`
per task back, in task order. Workers are long-lived: each one imports torch and Hydra once,
keeps the data sets it has built, and trains run after run through the ordinary job lifecycle
(qexp.train.job), so a run that was cut off is resumed and a completed one skipped.

Each worker has its share of the machine: ``threads`` CPU threads per run (a study setting,
not derived from the number of workers, so that a run's numbers do not depend on how many
workers ran beside it) and, on a GPU box, a GPU (worker i takes GPU i mod #GPUs, so several
workers share a GPU when there are more workers than GPUs). A local worker that dies (killed,
out of memory) is replaced, and its run is handed out again: it resumes from its last
checkpoint.
"""

from __future__ import annotations

import logging
import math
import multiprocessing as mp
import os
import queue
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("qexp")

#: a task whose worker dies this many times is given up
MAX_DEATHS = 3


@dataclass(frozen=True)
class TrialRef:
    """The Optuna trial a tuning run reports its validation curve to (for pruning)."""

    journal: str
    study_name: str
    trial_id: int
    startup_trials: int
    warmup_epochs: int
    #: the trial's last epoch when the pruner may not stop it there (None: it may)
    last_epoch: int | None = None
    #: the progress from which the trial's method trains its deployed form (its estimator's
    #: final_form_progress at the trial's knobs): no epoch before it is pruned (None: any)
    deployed_from: float | None = None


@dataclass(frozen=True)
class Task:
    """One run for a worker: the run's resolved config and dir, and how to run it.

    ``kind``: ``run`` (an ordinary run job) or ``cached`` (a full-precision run of the
    cache: a study's reference, trained once per key). ``fresh``: train from scratch even
    where the run dir holds a cut-off run (a tuning trial is fresh by nature).
    """

    key: str
    config: dict[str, Any]
    run_dir: str = ""
    kind: str = "run"
    seal_test: bool = False
    fresh: bool = False
    trial: TrialRef | None = None


@dataclass
class Result:
    """What became of a task: its metrics, or an error; ``pruned`` for a pruned trial."""

    key: str
    metrics: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    pruned: bool = False
    outcome: str | None = None
    worker: int = 0


@dataclass(frozen=True)
class Runtime:
    """A worker's share of the machine: torch threads per run, and its device."""

    threads: int | None = None
    device: str | None = None


# -- the worker side ------------------------------------------------------------------------------
def execute(task: Task, runtime: Runtime, worker: int = 0) -> Result:
    """Train one task in this process (any error becomes the result's one-line ``error``)."""
    from qexp.study.runs import train_study_run
    from qexp.train.job import Policy, one_line
    from qexp.train.partner import cached_fp_run
    from qexp.train.run import run_spec, train_cached_run

    try:
        if task.kind == "cached":
            config = _with_runtime(task.config, runtime)
            run_dir = cached_fp_run(config, train_cached_run, what="reference")
            from qexp.record import read_record

            record = read_record(run_dir)
            return Result(task.key, record.to_json() if record else {}, worker=worker)
        spec = run_spec(_with_runtime(task.config, runtime))
        hook = _pruning_hook(task.trial) if task.trial is not None else None
        policy = Policy.FRESH if task.fresh else Policy.AUTO
        job = train_study_run(spec, Path(task.run_dir), hook, task.seal_test, policy)
        return Result(task.key, job.metrics, outcome=job.outcome.value, worker=worker)
    except Exception as exc:  # one run's failure is its result, never the worker's end
        if type(exc).__name__ == "TrialPruned":
            return Result(task.key, pruned=True, error=one_line(exc), worker=worker)
        log.debug("task %s failed:\n%s", task.key, traceback.format_exc())
        return Result(task.key, error=one_line(exc), worker=worker)


def _with_runtime(config: dict[str, Any], runtime: Runtime) -> dict[str, Any]:
    """The config with this worker's threads and device (result-free keys: the run's
    fingerprint is unchanged)."""
    trainer = dict(config["trainer"])
    if runtime.threads is not None:
        trainer["threads"] = runtime.threads
    if runtime.device is not None:
        trainer["device"] = runtime.device
    return {**config, "trainer": trainer}


def _pruning_hook(ref: TrialRef):
    """The trainer's epoch hook of a tuning run: report val accuracy to the trial (in the
    study's journal) and stop with TrialPruned when the pruner says so."""
    import optuna

    from qexp.study.journal import make_pruner, storage_at

    study = optuna.load_study(
        study_name=ref.study_name,
        storage=storage_at(Path(ref.journal)),
        pruner=make_pruner(ref.startup_trials, ref.warmup_epochs),
    )
    # The trial was asked by the study's main process; this worker reports to it by id.
    trial = optuna.trial.Trial(study, ref.trial_id)

    def on_epoch(history: list[dict[str, float]]) -> bool:
        epoch = len(history)
        trial.report(float(history[-1]["val_acc"]), step=epoch)
        if ref.last_epoch is not None and epoch >= ref.last_epoch:
            return False  # pruning the last epoch would save nothing
        if ref.deployed_from is not None:
            progress = history[-1].get("progress")  # (unknown: as good as not yet there)
            if progress is None or progress < ref.deployed_from - 1e-12:
                return False  # the epoch's last step still trained a soft stand-in
        if trial.should_prune():
            raise optuna.TrialPruned(
                f"pruned by the tuner at epoch {epoch} (validation curve below the median of "
                "earlier trials)"
            )
        return False

    return on_epoch


def _worker_init(runtime: Runtime) -> None:
    """Once per worker process: its threads and device, the config schemas, the data-set
    cache (each run's log goes to its own train.log; warnings also to stderr)."""
    import torch

    from qexp.config.schema import register_schemas
    from qexp.train.run import enable_data_cache

    if runtime.threads is not None:
        torch.set_num_threads(runtime.threads)
    if runtime.device and runtime.device.startswith("cuda"):
        torch.cuda.set_device(torch.device(runtime.device))
    register_schemas()
    enable_data_cache()


def _worker_loop(index: int, runtime: Runtime, tasks: Any, results: Any) -> None:
    _worker_init(runtime)
    parent = os.getppid()
    while True:
        try:
            task = tasks.get(timeout=5.0)
        except queue.Empty:
            if os.getppid() != parent:  # the study was killed: do not linger as an orphan
                return
            continue
        if task is None:
            return
        results.put((index, execute(task, runtime, index)))


# -- pools ----------------------------------------------------------------------------------------
def worker_runtimes(workers: int, threads: int | None, gpus: int) -> list[Runtime]:
    """Each worker's runtime: ``threads`` per run; GPUs round robin where there are any."""
    if gpus > 0:
        return [Runtime(threads, f"cuda:{i % gpus}") for i in range(workers)]
    return [Runtime(threads, "cpu" if threads is not None else None) for _ in range(workers)]


class InProcess:
    """Runs every task in this process, one after another (``workers=1``)."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.workers = 1

    def run_all(self, tasks: list[Task]) -> list[Result]:
        """Run ``tasks``; their results in task order."""
        from qexp.train.run import enable_data_cache

        enable_data_cache()
        return [execute(t, self.runtime) for t in tasks]

    def close(self) -> None:
        """Nothing to release."""


class NoTraining:
    """Trains nothing: every task comes back without an outcome (``qexp study --preview``
    reads what the study's calls stored, beside a call that may still be running)."""

    workers = 1

    def run_all(self, tasks: list[Task]) -> list[Result]:
        """``tasks``' results, none of them run (no outcome: nothing was done)."""
        return [Result(t.key) for t in tasks]

    def close(self) -> None:
        """Nothing to release."""


class LocalPool:
    """Long-lived worker processes on this machine, fed one task at a time.

    A worker that dies is replaced and its task handed out again (it resumes from its last
    checkpoint through the job lifecycle).
    """

    def __init__(self, runtimes: list[Runtime]) -> None:
        self.ctx = mp.get_context("spawn")  # no forked torch / CUDA state in the workers
        self.runtimes = runtimes
        self.workers = len(runtimes)
        self.results = self.ctx.Queue()
        self.procs: list[Any] = [None] * self.workers
        self.inboxes: list[Any] = [None] * self.workers
        self.replaced = 0
        #: how often each task's worker died running it: a task that kills its worker
        #: MAX_DEATHS times is given up (failed), not handed out forever
        self.deaths: dict[str, int] = {}
        for i in range(self.workers):
            self._start(i)

    def _start(self, i: int) -> None:
        self.inboxes[i] = self.ctx.Queue()
        self.procs[i] = self.ctx.Process(
            target=_worker_loop,
            args=(i, self.runtimes[i], self.inboxes[i], self.results),
            daemon=True,
            name=f"qexp-worker-{i}",
        )
        self.procs[i].start()

    def run_all(self, tasks: list[Task]) -> list[Result]:
        """Run ``tasks`` on the workers; their results in task order."""
        pending = deque(enumerate(tasks))
        busy: dict[int, tuple[int, Task]] = {}
        done: dict[int, Result] = {}
        while len(done) < len(tasks):
            for i in range(self.workers):
                if i not in busy and pending:
                    busy[i] = pending.popleft()
                    self.inboxes[i].put(busy[i][1])
            try:
                worker, result = self.results.get(timeout=1.0)
            except queue.Empty:
                for index, task in self._replace_dead(busy):
                    self.deaths[task.key] = self.deaths.get(task.key, 0) + 1
                    if self.deaths[task.key] >= MAX_DEATHS:
                        error = f"its worker died {MAX_DEATHS} times running it"
                        done[index] = Result(task.key, error=error)
                    else:
                        pending.appendleft((index, task))
                continue
            index, _ = busy.pop(worker)
            done[index] = result
        return [done[i] for i in range(len(tasks))]

    def _replace_dead(self, busy: dict[int, tuple[int, Task]]) -> list[tuple[int, Task]]:
        """Start a new worker in place of each dead one; return the tasks they held."""
        lost_tasks = []
        for i, proc in enumerate(self.procs):
            if proc.is_alive():
                continue
            lost = busy.pop(i, None)
            log.warning(
                "worker %d died (exit code %s)%s; starting a new one", i, proc.exitcode,
                f": its run {lost[1].key} is handed out again" if lost else "",
            )  # fmt: skip
            print(f"[study] worker {i} died (exit code {proc.exitcode}); replaced", flush=True)
            if lost is not None:
                lost_tasks.append(lost)
            self.replaced += 1
            self._start(i)
        return lost_tasks

    def close(self) -> None:
        """Stop the workers."""
        for i, proc in enumerate(self.procs):
            if proc.is_alive():
                self.inboxes[i].put(None)
        deadline = time.time() + 10
        for proc in self.procs:
            proc.join(timeout=max(0.1, deadline - time.time()))
            if proc.is_alive():
                proc.terminate()


class SubmititPool:
    """A stage as a job array through submitit: ``workers`` array tasks (at most), each a
    long-lived worker over its share of the stage's tasks; waits and collects, as Hydra's
    submitit launcher does for sweeps.

    ``cluster``: ``slurm``, or ``local`` (submitit's local executor, for tests and a quick
    check of a Slurm set-up on one machine). ``options``: submitit's parameters (partition,
    timeout_min, cpus_per_task, gpus_per_node, mem_gb, ...).
    """

    def __init__(self, folder: Path, workers: int, runtime: Runtime, cluster: str,
                 options: dict[str, Any]) -> None:  # fmt: skip
        import submitit

        self.workers = workers
        self.runtime = runtime
        self.executor = submitit.AutoExecutor(folder=str(folder), cluster=cluster)
        params = {"timeout_min": 60, **options}
        if cluster == "local":
            params = {k: v for k, v in params.items() if not k.startswith("slurm_")}
        self.executor.update_parameters(**params)

    def run_all(self, tasks: list[Task]) -> list[Result]:
        """Run ``tasks`` as one job array; their results in task order."""
        if not tasks:
            return []
        n = min(self.workers, len(tasks))
        chunks = [tasks[i::n] for i in range(n)]
        jobs = self.executor.map_array(_run_chunk, chunks, [self.runtime] * n)
        by_key: dict[str, Result] = {}
        for job, chunk in zip(jobs, chunks, strict=True):
            try:
                results = job.result()
            except Exception as exc:  # the array task itself died (time limit, node lost)
                lines = str(exc).strip().splitlines()
                error = f"job {job.job_id} failed: {lines[-1] if lines else exc}"
                results = [Result(t.key, error=error) for t in chunk]
            for r in results:
                by_key[r.key] = r
        return [by_key[t.key] for t in tasks]

    def close(self) -> None:
        """Nothing to release (the array tasks end with their chunk)."""


def _run_chunk(tasks: list[Task], runtime: Runtime) -> list[Result]:
    """One array task: a worker over its chunk of the stage."""
    _worker_init(runtime)
    return [execute(t, runtime) for t in tasks]


def default_workers(threads: int | None) -> int:
    """Workers that fit this machine: its CPUs (affinity mask) divided by threads per run."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, math.floor((cpus or 1) / max(1, threads or 1)))
