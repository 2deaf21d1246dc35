"""Tuning: the same Optuna budget for every method, on validation accuracy only.

One Optuna study per cell (setting, method), each in its own journal file in the cell's dir
(``tuning/<setting>/<method>/optuna.journal``): journal files need no database server, work on
shared file systems, and travel with the study dir, so a study continued on another machine
(or in another shard) finds every trial told so far. Each trial is an ordinary qexp run with
its test split sealed (qexp.data.sealed); its validation curve is reported epoch by epoch and
a trial below the median of earlier trials at the same epoch is pruned, never before the epoch
given as the warm-up. Failed and pruned trials count against the budget; trials cut off by a
killed study do not (they are closed as failed with ``interrupted`` set and replaced).

Trials are asked and told by the study's main process in rounds (qexp.study.pipeline): each
round asks up to ``parallel`` trials of every cell that still needs some, the workers train
them side by side, and they are told in the order they were asked. With one trial per cell and
round (the default whenever there are at least as many cells as workers) every trial of a cell
sees all the cell's earlier trials, so the tuning result does not depend on the number of
workers; the round of each trial is stored with it (``round``), so the report can say what a
rerun would change.

Why Optuna itself rather than hydra-optuna-sweeper: that plugin pins optuna < 3, its SQLite
storage breaks with SQLAlchemy 2, it cannot prune from per-epoch validation curves (a sweeper
sees only a job's final return value), and it would need `interval()` sweep syntax that qexp's
preflight rejects. The ask/tell API gives pruning, a resumable journal and an exact trial count.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from qexp.spec import RunSpec
from qexp.study.journal import make_pruner, storage_at
from qexp.study.space import Knob, suggest
from qexp.study.workers import Result, Task, TrialRef

JOURNAL = "optuna.journal"


@dataclass
class TuneResult:
    """What tuning one cell found."""

    best_params: dict[str, Any] | None  # None: no trial completed (the method failed here)
    best_val: float | None
    trials: list[dict[str, Any]] = field(default_factory=list)
    ran: int = 0  # trials run by this call (0 on a rerun of a finished study)

    @property
    def failed(self) -> bool:
        """Whether every trial failed or was pruned."""
        return self.best_params is None

    @property
    def first_error(self) -> str | None:
        """The error of the first failed trial, for the report."""
        return next((t["error"] for t in self.trials if t.get("error")), None)


def _counted(t: optuna.trial.FrozenTrial) -> bool:
    """Whether a trial used up part of the budget (cut-off trials of a killed study do not)."""
    if t.state in (TrialState.COMPLETE, TrialState.PRUNED):
        return True
    return t.state is TrialState.FAIL and not t.user_attrs.get("interrupted")


class CellTuner:
    """The Optuna study of one cell, asked and told by the study's main process.

    ``make_specs(values)`` composes the run specs of chosen knob values, one per tuning seed;
    the trial's objective is their mean best validation accuracy. Trial ``n`` trains in
    ``cell_dir/trial<n>`` (``trial<n>/seed<s>`` with several seeds). ``study_dir``: trial run
    dirs are stored relative to it. Only the first seed's run reports its validation curve
    for pruning (a pruned trial is pruned whatever its other seeds do).
    ``prune_warmup_epochs``: the first epoch a trial may be pruned at (Optuna's
    ``n_warmup_steps``); ``deployed_from(spec)``: where the trial's method trains its deployed
    form, from the trial's own run spec (its knobs decide it; None: prune from the warm-up
    on), no epoch whose last step came before it being pruned; ``prune_last_epoch``: whether
    the pruner may stop a trial at its last epoch; ``epochs``: a trial's length, for trials
    that did not record it.
    """

    def __init__(
        self,
        cell_dir: Path,
        study_dir: Path,
        name: str,
        trials: int,
        knobs: list[Knob],
        make_specs: Callable[[dict[str, Any]], list[tuple[int, RunSpec]]],
        sampler: optuna.samplers.BaseSampler,
        prune_startup_trials: int,
        prune_warmup_epochs: int,
        read_only: bool = False,
        prune_last_epoch: bool = True,
        epochs: int | None = None,
        deployed_from: Callable[[RunSpec], float] | None = None,
    ) -> None:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.cell_dir, self.study_dir, self.name = cell_dir, study_dir, name
        self.trials, self.knobs, self.make_specs = trials, knobs, make_specs
        self.journal = cell_dir / JOURNAL
        self.prune = (prune_startup_trials, prune_warmup_epochs)
        self.deployed_from = deployed_from
        self.read_only = read_only
        self.prune_last_epoch = prune_last_epoch
        self.epochs = epochs  # a trial's training length (for trials that did not record it)
        if read_only:
            # a preview beside a running study: read its journal, write nothing (its
            # running trials are another process's, not cut off)
            try:
                if not self.journal.exists():  # (opening a journal would create the file)
                    raise KeyError(name)
                self.study = optuna.load_study(study_name=name, storage=storage_at(self.journal))
            except KeyError:  # no journal yet, or one whose study is being created right now
                self.study = optuna.create_study(study_name=name, direction="maximize")
            self.in_flight = self.ran = 0
            return
        self.study = optuna.create_study(
            study_name=name,
            storage=storage_at(self.journal),
            direction="maximize",
            load_if_exists=True,
            sampler=sampler,
            pruner=make_pruner(*self.prune),
        )
        for t in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            # a trial of a killed study: close it and let a fresh one take its place
            self.study._storage.set_trial_user_attr(t._trial_id, "interrupted", True)
            self.study.tell(t.number, state=TrialState.FAIL)
        self.in_flight = 0
        self.ran = 0

    def remaining(self) -> int:
        """Trials still to ask for the budget (those asked and not yet told included)."""
        counted = sum(_counted(t) for t in self.study.get_trials(deepcopy=False))
        return max(0, self.trials - counted - self.in_flight)

    def ask(self, round_: int) -> tuple[optuna.Trial, list[Task]]:
        """A new trial and the tasks that train it (one per tuning seed)."""
        if self.read_only:
            raise RuntimeError(f"{self.name}: a read-only tuner asks no trials")
        trial = self.study.ask()
        values = suggest(trial, self.knobs)
        specs = self.make_specs(values)
        run_dir = self.cell_dir / f"trial{trial.number:03d}"
        trial.set_user_attr("run_dir", _relative(run_dir, self.study_dir))
        trial.set_user_attr("round", round_)
        epochs = specs[0][1].trainer.epochs
        trial.set_user_attr("planned_epochs", epochs)
        deployed = None if self.deployed_from is None else self.deployed_from(specs[0][1])
        if deployed is not None:
            trial.set_user_attr("deployed_from", deployed)
        last = None if self.prune_last_epoch else epochs
        ref = TrialRef(str(self.journal), self.name, trial._trial_id, *self.prune, last,
                       deployed)  # fmt: skip
        tasks = [
            Task(
                key=f"{self.name}/trial{trial.number}/seed{seed}",
                config=spec.config,
                run_dir=str(run_dir / f"seed{seed}" if len(specs) > 1 else run_dir),
                seal_test=True,
                trial=ref if i == 0 else None,
            )
            for i, (seed, spec) in enumerate(specs)
        ]
        self.in_flight += 1
        return trial, tasks

    def tell(self, trial: optuna.Trial, results: list[Result]) -> None:
        """Tell the study what became of ``trial`` (its runs' results, in seed order)."""
        self.in_flight -= 1
        self.ran += 1
        if any(r.pruned for r in results):
            self.study.tell(trial, state=TrialState.PRUNED)
            return
        values = [r.metrics.get("best_val_acc") if r.error is None else None for r in results]
        if any(v is None or not math.isfinite(float(v)) for v in values):
            bad = next(r for r, v in zip(results, values, strict=True)
                       if v is None or not math.isfinite(float(v)))  # fmt: skip
            error = bad.error or bad.metrics.get("reason") or "no validation accuracy"
            trial.set_user_attr("error", error)
            self.study.tell(trial, state=TrialState.FAIL)
            return
        if len(values) > 1:
            trial.set_user_attr("per_seed", [float(v) for v in values])
        self.study.tell(trial, sum(float(v) for v in values) / len(values))

    def result(self) -> TuneResult:
        """The cell's trials and its best knobs."""
        rows = []
        for t in self.study.get_trials(deepcopy=False):
            if not _counted(t):
                continue
            rows.append(
                {
                    "number": t.number,
                    "state": t.state.name.lower(),
                    "val_acc": t.value,
                    "params": dict(t.params),
                    "epochs": len(t.intermediate_values),
                    "error": t.user_attrs.get("error"),
                    "run_dir": t.user_attrs.get("run_dir"),
                    "round": t.user_attrs.get("round"),
                    "per_seed": t.user_attrs.get("per_seed"),
                    "planned_epochs": t.user_attrs.get("planned_epochs", self.epochs),
                }
            )
        done = [t for t in self.study.get_trials(deepcopy=False) if t.state is TrialState.COMPLETE]
        if not done:
            return TuneResult(None, None, rows, self.ran)
        best = max(done, key=lambda t: (t.value, -t.number))
        return TuneResult(dict(best.params), float(best.value), rows, self.ran)


def _relative(path: Path, base: Path) -> str:
    try:
        return path.resolve().relative_to(base.resolve()).as_posix()
    except ValueError:
        return str(path)
