"""Optuna's storage and pruner as a study uses them, shared by the tuner (the study's main
process) and the workers that report their trials' validation curves."""

from __future__ import annotations

from pathlib import Path

import optuna
from optuna.storages.journal import JournalFileBackend, JournalStorage


def storage_at(journal: Path) -> JournalStorage:
    """The Optuna storage of one journal file (no database server; safe for several
    processes, and on shared file systems)."""
    journal.parent.mkdir(parents=True, exist_ok=True)
    return JournalStorage(JournalFileBackend(str(journal)))


def make_pruner(startup_trials: int, warmup_epochs: int) -> optuna.pruners.BasePruner:
    """Median pruning after ``startup_trials`` finished trials, from epoch ``warmup_epochs``
    of a trial on (Optuna's ``n_warmup_steps``: steps below it are never pruned; the steps
    are epochs counted from 1, so 0 and 1 both let the first epoch be pruned)."""
    return optuna.pruners.MedianPruner(
        n_startup_trials=startup_trials, n_warmup_steps=warmup_epochs
    )
