"""Tuning: the same Optuna budget for every method, on validation accuracy only.

One Optuna study per (setting, method), all stored in one journal file under the study dir, so
a rerun continues where the last one stopped. Each trial is an ordinary qexp run with its test
split sealed (qexp.data.sealed); its validation curve is reported epoch by epoch and a trial
below the median of earlier trials at the same epoch is pruned. Failed and pruned trials count
against the budget; trials cut off by a killed study do not (they are closed as failed with
``interrupted`` set and replaced).

Why Optuna itself rather than hydra-optuna-sweeper: that plugin pins optuna < 3, its SQLite
storage breaks with SQLAlchemy 2, it cannot prune from per-epoch validation curves (a sweeper
sees only a job's final return value), and it would need `interval()` sweep syntax that qexp's
preflight rejects. The ask/tell API gives pruning, a resumable journal and an exact trial count.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.storages.journal import JournalFileBackend, JournalStorage
from optuna.trial import TrialState

from qexp.study.runs import train_study_run
from qexp.study.space import Knob, suggest
from qexp.train.job import Policy

log = logging.getLogger("qexp")

JOURNAL = "optuna.journal"


@dataclass
class TuneResult:
    """What tuning one (setting, method) found."""

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


def storage(study_dir: Path) -> JournalStorage:
    """The Optuna storage of a study dir (a journal file, no database server)."""
    path = study_dir / "tuning" / JOURNAL
    path.parent.mkdir(parents=True, exist_ok=True)
    return JournalStorage(JournalFileBackend(str(path)))


def _counted(t: optuna.trial.FrozenTrial) -> bool:
    """Whether a trial used up part of the budget (cut-off trials of a killed study do not)."""
    if t.state in (TrialState.COMPLETE, TrialState.PRUNED):
        return True
    return t.state is TrialState.FAIL and not t.user_attrs.get("interrupted")


def pruning_hook(trial: optuna.Trial):
    """The trainer's epoch hook: report val accuracy; raise TrialPruned when Optuna says so."""

    def on_epoch(history: list[dict[str, float]]) -> bool:
        epoch = len(history)
        trial.report(float(history[-1]["val_acc"]), step=epoch)
        if trial.should_prune():
            raise optuna.TrialPruned(
                f"pruned by the tuner at epoch {epoch} (validation curve below the median of "
                "earlier trials)"
            )
        return False

    return on_epoch


def tune(
    study_dir: Path,
    name: str,
    trials: int,
    knobs: list[Knob],
    make_spec,
    run_dir_of,
    sampler_seed: int,
    prune_startup_trials: int,
    prune_warmup_epochs: int,
) -> TuneResult:
    """Run the trials of one (setting, method) until ``trials`` have counted.

    ``make_spec(values)`` composes the run spec of chosen knob values; ``run_dir_of(number)``
    is the run dir of a trial.
    """
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        study_name=name,
        storage=storage(study_dir),
        direction="maximize",
        load_if_exists=True,
        sampler=optuna.samplers.TPESampler(seed=sampler_seed),
        pruner=optuna.pruners.MedianPruner(
            n_startup_trials=prune_startup_trials, n_warmup_steps=prune_warmup_epochs
        ),
    )
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        # a trial of a killed study: close it and let a fresh one take its place
        study._storage.set_trial_user_attr(t._trial_id, "interrupted", True)
        study.tell(t.number, state=TrialState.FAIL)
    ran = 0
    while sum(_counted(t) for t in study.get_trials(deepcopy=False)) < trials:
        trial = study.ask()
        values = suggest(trial, knobs)
        run_dir = run_dir_of(trial.number)
        trial.set_user_attr("run_dir", str(run_dir))
        ran += 1
        try:
            metrics = train_study_run(
                make_spec(values), run_dir, pruning_hook(trial), seal_test=True,
                policy=Policy.FRESH,
            ).metrics
        except optuna.TrialPruned:
            study.tell(trial, state=TrialState.PRUNED)
            continue
        except Exception as exc:  # any error fails this trial only, never the study
            trial.set_user_attr("error", (str(exc).splitlines() or [type(exc).__name__])[0])
            study.tell(trial, state=TrialState.FAIL)
            continue
        value = metrics.get("best_val_acc")
        if value is None or not math.isfinite(float(value)):
            trial.set_user_attr("error", metrics.get("reason") or "no validation accuracy")
            study.tell(trial, state=TrialState.FAIL)
        else:
            study.tell(trial, float(value))
    return _result(study, ran)


def _result(study: optuna.Study, ran: int) -> TuneResult:
    rows = []
    for t in study.get_trials(deepcopy=False):
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
            }
        )
    done = [t for t in study.get_trials(deepcopy=False) if t.state is TrialState.COMPLETE]
    if not done:
        return TuneResult(None, None, rows, ran)
    best = max(done, key=lambda t: (t.value, -t.number))
    return TuneResult(dict(best.params), float(best.value), rows, ran)
