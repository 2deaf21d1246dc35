"""A study's results as typed rows: what results.json holds and the report reads.

Every row is a frozen dataclass with ``to_json()`` / ``from_json()``; results.json stays a
plain JSON object (undefined numbers, e.g. the interval of a single seed, are null, never
NaN). Rows read old files too: a key a row does not know is ignored, a key it lacks takes the
field's default.
"""

from __future__ import annotations

import math
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, TypeVar

Row = TypeVar("Row")


def finite(x: Any) -> Any:
    """NaN as None (results.json is strict JSON; the report reads None as "undefined")."""
    return None if isinstance(x, float) and math.isnan(x) else x


def _plain(obj: Any) -> Any:
    """JSON-able copy: NaN as None, tuples as lists, rows as their JSON."""
    if hasattr(obj, "to_json"):
        return obj.to_json()
    if isinstance(obj, float):
        return finite(obj)
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def _row_json(row: Any, omit_none: tuple[str, ...] = ()) -> dict[str, Any]:
    out = {}
    for f in fields(row):
        value = getattr(row, f.name)
        if value is None and f.name in omit_none:
            continue
        out[f.name] = _plain(value)
    return out


def _row_from(cls: type[Row], data: dict[str, Any], **nested: Any) -> Row:
    """``cls`` from a JSON object: known keys only, NaN as None, ``nested`` converted."""
    kwargs: dict[str, Any] = {}
    for f in fields(cls):  # type: ignore[arg-type]
        if f.name in nested:
            kwargs[f.name] = nested[f.name]
        elif f.name in data:
            kwargs[f.name] = finite(data[f.name])
        elif f.default is MISSING and f.default_factory is MISSING:
            raise ValueError(f"{cls.__name__} needs {f.name!r}")
    return cls(**kwargs)


@dataclass(frozen=True)
class ReferenceRow:
    """One full-precision reference network (a network form, data set and seed)."""

    setting: str
    seed: int
    run_dir: str
    #: the network's model config: equal dicts = the same network form
    model: dict[str, Any] = field(default_factory=dict)
    test_acc: float | None = None
    best_val_acc: float | None = None
    epochs_done: int = 0
    best_epoch: int | None = None
    max_epochs: int | None = None
    plateau_gain: float | None = None
    converged: bool = False
    train_time_s: float | None = None

    def to_json(self) -> dict[str, Any]:
        return _row_json(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ReferenceRow:
        return _row_from(cls, data)


@dataclass(frozen=True)
class TrialRow:
    """One tuning trial of a cell."""

    number: int
    state: str  # complete / pruned / fail
    val_acc: float | None = None
    params: dict[str, Any] = field(default_factory=dict)
    epochs: int | None = None
    error: str | None = None
    run_dir: str | None = None

    def to_json(self) -> dict[str, Any]:
        return _row_json(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TrialRow:
        return _row_from(cls, data)


@dataclass(frozen=True)
class RunRow:
    """One final run (a setting, method and seed)."""

    setting: str
    method: str
    seed: int
    run_dir: str | None = None
    status: str = "missing"
    reason: str | None = None
    test_acc: float | None = None
    best_val_acc: float | None = None
    epochs_done: int | None = None
    train_time_s: float | None = None
    forward_per_step: int | None = None
    backward_per_step: int | None = None
    #: why the run could not be started (present in results.json only when set)
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return _row_json(self, omit_none=("error",))

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RunRow:
        return _row_from(cls, data)


@dataclass(frozen=True)
class CellRow:
    """One (setting, method): its tuning outcome, its test accuracy over seeds and cost."""

    setting: str
    title: str
    bits: int
    method: str
    status: str  # completed / failed / no runs
    error: str | None = None
    n: int = 0
    mean: float | None = None
    low: float | None = None  # 95% Student-t interval over seeds (None below 2 seeds)
    high: float | None = None
    train_time_s: float | None = None  # mean over seeds
    forward_per_step: int | None = None
    backward_per_step: int | None = None
    best_params: dict[str, Any] | None = None
    best_val: float | None = None
    #: tuned key -> its range in words
    space: dict[str, str] = field(default_factory=dict)
    trials: tuple[TrialRow, ...] = ()

    @property
    def trial_counts(self) -> tuple[int, int, int]:
        """(completed, pruned, failed) tuning trials."""
        states = [t.state for t in self.trials]
        return states.count("complete"), states.count("pruned"), states.count("fail")

    def to_json(self) -> dict[str, Any]:
        return _row_json(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CellRow:
        trials = tuple(TrialRow.from_json(t) for t in data.get("trials") or [])
        return _row_from(cls, data, trials=trials, space=dict(data.get("space") or {}))


@dataclass(frozen=True)
class ComparisonRow:
    """A method minus its setting's baseline, paired by seed, with its test."""

    setting: str
    method: str
    baseline: str
    n: int
    diff: float | None
    low: float | None  # 95% interval of the mean paired difference
    high: float | None
    p: float | None  # two-sided paired t-test
    p_holm: float | None  # Holm over every comparison of the study
    verdict: str

    def to_json(self) -> dict[str, Any]:
        return _row_json(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ComparisonRow:
        return _row_from(cls, data)


@dataclass(frozen=True)
class ClaimRow:
    """A paper's claim, as the spec states it."""

    method: str
    setting: str
    text: str
    source: str = ""
    diff: float | None = None  # claimed gain over the baseline (fraction), if numeric

    def to_json(self) -> dict[str, Any]:
        return _row_json(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ClaimRow:
        return _row_from(cls, data)


@dataclass(frozen=True)
class StudyResults:
    """Everything a study measured: results.json, typed."""

    name: str
    seeds: tuple[int, ...]
    alpha: float
    references: tuple[ReferenceRow, ...] = ()
    cells: tuple[CellRow, ...] = ()
    comparisons: tuple[ComparisonRow, ...] = ()
    runs: tuple[RunRow, ...] = ()
    claims: tuple[ClaimRow, ...] = ()

    def comparison(self, setting: str, method: str) -> ComparisonRow | None:
        """The comparison of (setting, method) with its baseline, if one was made."""
        return next(
            (c for c in self.comparisons if (c.setting, c.method) == (setting, method)), None
        )

    def to_json(self) -> dict[str, Any]:
        """The plain JSON object of results.json."""
        return _row_json(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> StudyResults:
        """From a results.json object (old files included)."""
        return _row_from(
            cls,
            data,
            seeds=tuple(int(s) for s in data.get("seeds") or ()),
            references=tuple(ReferenceRow.from_json(r) for r in data.get("references") or []),
            cells=tuple(CellRow.from_json(c) for c in data.get("cells") or []),
            comparisons=tuple(ComparisonRow.from_json(c) for c in data.get("comparisons") or []),
            runs=tuple(RunRow.from_json(r) for r in data.get("runs") or []),
            claims=tuple(ClaimRow.from_json(c) for c in data.get("claims") or []),
        )


def from_summary(summary: dict[str, Any]) -> StudyResults:
    """The typed results of the dict ``qexp.study.pipeline.summarize`` returns (after
    ``portable_paths``): the pipeline's one-line switch to typed results."""
    return StudyResults.from_json(_plain(summary))
