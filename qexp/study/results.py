"""A study's results as typed rows: what results.json holds and the report reads.

A cell is a (setting, method) at one training condition: a budget (epochs or steps) and an
optimizer, both None in studies that vary neither. :func:`analyze` recomputes every statistic
from the final runs' rows (so an old results.json gets the current statistics too):

* exploratory: each method against its condition's baseline, paired by seed, two-sided,
  Holm over all comparisons, with Cohen's d_z and the minimum detectable effect;
* confirmatory: each numeric claim, two one-sided tests (the gain is below the claim; the
  gain is above 0), Holm within that family only (qexp.study.stats.claim_family_tests);
* A/A: the baseline against itself on a second, disjoint seed set (the noise floor).

Every row is a frozen dataclass with ``to_json()`` / ``from_json()``; results.json stays a
plain JSON object (undefined numbers, e.g. the interval of a single seed, are null, never
NaN). Rows read old files too: a key a row does not know is ignored, a key it lacks takes the
field's default.
"""

from __future__ import annotations

import math
from dataclasses import MISSING, dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from qexp.study import stats

if TYPE_CHECKING:
    from typing import Self  # Python 3.11 (annotations only: this module runs on 3.10)

    from qexp.study.spec import StudySpec

Row = TypeVar("Row")
#: (setting, budget, optimizer): the runs a baseline is compared within
Condition = tuple[str, "float | None", "str | None"]
#: the verdicts of a claim's two one-sided tests (see :func:`claim_verdict`)
CLAIM_NOT_OBSERVED = "not observed"
CLAIM_SMALLER = "smaller gain"
CLAIM_CONSISTENT = "consistent"
CLAIM_INCONCLUSIVE = "inconclusive"


def condition_words(setting: str, budget: float | None, optimizer: str | None) -> str:
    """A cell's condition in words: "w1a1", "w1a1, budget 4, adam"."""
    parts = [setting]
    if budget is not None:
        parts.append(f"budget {budget:g}")
    if optimizer is not None:
        parts.append(optimizer)
    return ", ".join(parts)


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


class JsonRow:
    """The JSON side of every row (a frozen dataclass): ``to_json`` writes each field (the
    ``OMIT_NONE`` ones only when set: keys older files never had); ``from_json`` reads the
    keys the row knows, :meth:`nested` converting fields that hold rows or tuples."""

    OMIT_NONE: ClassVar[tuple[str, ...]] = ()

    def to_json(self) -> dict[str, Any]:
        """The row as a plain JSON object."""
        return _row_json(self, self.OMIT_NONE)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Self:
        """The row from a JSON object (old files included)."""
        return _row_from(cls, data, **cls.nested(data))

    @classmethod
    def nested(cls, data: dict[str, Any]) -> dict[str, Any]:
        """The fields of ``data`` that need converting (none unless a row says so)."""
        return {}


@dataclass(frozen=True)
class ReferenceRow(JsonRow):
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
    #: the test accuracy first recorded, where a retrained copy (a fresh cache) differs
    recorded_test_acc: float | None = None

    OMIT_NONE = ("recorded_test_acc",)


@dataclass(frozen=True)
class TrialRow(JsonRow):
    """One tuning trial of a cell."""

    number: int
    state: str  # complete / pruned / fail
    val_acc: float | None = None
    params: dict[str, Any] = field(default_factory=dict)
    epochs: int | None = None  # epochs it reported (where it stopped, if pruned)
    error: str | None = None
    run_dir: str | None = None
    planned_epochs: int | None = None  # its training length

    @property
    def pruned_at_end(self) -> bool:
        """Pruned at its last epoch (nothing saved: a finished trial turned into a pruned one)."""
        return (self.state == "pruned" and self.planned_epochs is not None
                and self.epochs is not None and self.epochs >= self.planned_epochs)  # fmt: skip

    OMIT_NONE = ("planned_epochs",)  # unknown in files from before it was recorded


@dataclass(frozen=True)
class RunRow(JsonRow):
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
    budget: float | None = None  # training length (epochs or steps); None: not varied
    optimizer: str | None = None  # None: not varied

    @property
    def condition(self) -> Condition:
        return (self.setting, self.budget, self.optimizer)

    OMIT_NONE = ("error",)


@dataclass(frozen=True)
class CellRow(JsonRow):
    """One (setting, method): its tuning outcome, its test accuracy over seeds and cost."""

    setting: str
    title: str
    bits: float  # an int, or 1.58 (ternary)
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
    budget: float | None = None
    optimizer: str | None = None
    #: the run seeds of its tuning trials (empty in old files: the spec's tuning.seed)
    tuning_seeds: tuple[int, ...] = ()
    #: the setting whose tuned knobs (and trials) this cell uses (None: tuned itself)
    knobs_from: str | None = None
    #: the LR scale its final runs took from the carry check (``carry_check.adopt``; its
    #: ``best_params`` hold the LR they trained at); None: the tuned LR
    lr_scale: float | None = None

    OMIT_NONE = ("lr_scale",)

    @property
    def condition(self) -> Condition:
        return (self.setting, self.budget, self.optimizer)

    @property
    def trial_counts(self) -> tuple[int, int, int]:
        """(completed, pruned, failed) tuning trials."""
        states = [t.state for t in self.trials]
        return states.count("complete"), states.count("pruned"), states.count("fail")

    @classmethod
    def nested(cls, data: dict[str, Any]) -> dict[str, Any]:
        return {
            "trials": tuple(TrialRow.from_json(t) for t in data.get("trials") or []),
            "space": dict(data.get("space") or {}),
            "tuning_seeds": tuple(int(s) for s in data.get("tuning_seeds") or ()),
        }


@dataclass(frozen=True)
class ComparisonRow(JsonRow):
    """A method minus its setting's baseline (or, for a control, minus the method the spec's
    ``controls`` name in ``baseline``), paired by seed, with its test."""

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
    budget: float | None = None
    optimizer: str | None = None
    sd: float | None = None  # sample SD of the paired differences
    d_z: float | None = None  # Cohen's d_z: diff / sd
    #: minimum detectable effect of the two-sided paired t-test at the study's alpha and
    #: 80% power: noncentral t (mde), and its normal approximation (mde_normal)
    mde: float | None = None
    mde_normal: float | None = None
    kind: str = "baseline"  # "baseline" | "control" (a planned comparison of the spec)

    @property
    def condition(self) -> Condition:
        return (self.setting, self.budget, self.optimizer)


@dataclass(frozen=True)
class ClaimRow(JsonRow):
    """A paper's claim, as the spec states it."""

    method: str
    setting: str
    text: str
    source: str = ""
    diff: float | None = None  # claimed gain over the baseline (fraction), if numeric
    budget: float | None = None  # tested at this budget / optimizer only (None: at all)
    optimizer: str | None = None


@dataclass(frozen=True)
class ClaimTestRow(JsonRow):
    """A numeric claim tested at one condition: a member of the confirmatory family."""

    method: str
    setting: str
    budget: float | None
    optimizer: str | None
    baseline: str
    claimed: float
    n: int
    diff: float | None  # mean paired gain over the baseline
    sd: float | None
    #: two-sided interval at level ``level`` = 1 - 2 alpha / m (Bonferroni over the family's
    #: m tests): each end is the one-sided bound matching one of the two tests
    low: float | None
    high: float | None
    level: float
    p_below: float | None  # H0: true gain >= claimed (one-sided, raw)
    p_gain: float | None  # H0: true gain <= 0 (one-sided, raw)
    p_below_holm: float | None  # Holm within the confirmatory family
    p_gain_holm: float | None
    verdict: str  # one of the CLAIM_* words


@dataclass(frozen=True)
class AARow(JsonRow):
    """The baseline against itself on two disjoint seed sets, paired by index: how far apart
    two runs of the same method land by chance (the noise floor of every comparison)."""

    setting: str
    budget: float | None
    optimizer: str | None
    method: str
    seeds: tuple[int, ...]  # the study's seeds (first set)
    other_seeds: tuple[int, ...]  # the A/A seeds (second set), paired in sorted order
    n: int
    diff: float | None  # second set minus first set
    low: float | None
    high: float | None
    p: float | None
    sd: float | None

    @classmethod
    def nested(cls, data: dict[str, Any]) -> dict[str, Any]:
        return {"seeds": tuple(data.get("seeds") or ()),
                "other_seeds": tuple(data.get("other_seeds") or ())}  # fmt: skip


@dataclass(frozen=True)
class CarryRow(JsonRow):
    """One run of the knob carry check: a method's borrowed knobs, its LR scaled, at the
    borrowing setting's budget on one tuning seed (validation accuracy only)."""

    setting: str
    method: str
    lr_scale: float
    seed: int
    setting_key: str = ""
    budget: float | None = None
    optimizer: str | None = None
    tuned_at: str = ""  # the key of the setting whose tuning found the knobs
    lr: float | None = None
    best_val_acc: float | None = None
    run_dir: str | None = None
    error: str | None = None
    train_time_s: float | None = None

    @property
    def condition(self) -> Condition:
        return (self.setting, self.budget, self.optimizer)

    OMIT_NONE = ("error",)


@dataclass(frozen=True)
class SpecChangeRow(JsonRow):
    """A change of the spec a study dir accepted after it began (keys that change no run,
    or appended settings), with how many runs had finished by then."""

    when: str
    keys: tuple[str, ...]
    tuning_runs_completed: int = 0
    final_runs_completed: int = 0
    note: str | None = None  # how the entry was made when not by the call (reconstructed)

    OMIT_NONE = ("note",)

    @classmethod
    def nested(cls, data: dict[str, Any]) -> dict[str, Any]:
        return {"keys": tuple(data.get("keys") or ())}


@dataclass(frozen=True)
class PieceRow(JsonRow):
    """One call of ``qexp study`` (a piece of the study): when, how long, on what."""

    started: str
    wall_s: float | None = None
    finished: bool = False
    machine: dict[str, Any] = field(default_factory=dict)
    execution: dict[str, Any] = field(default_factory=dict)
    #: how the record was made when not by the call itself (e.g. reconstructed afterwards)
    note: str | None = None

    OMIT_NONE = ("note",)


@dataclass(frozen=True)
class StudyResults(JsonRow):
    """Everything a study measured: results.json, typed."""

    name: str
    seeds: tuple[int, ...]
    alpha: float
    references: tuple[ReferenceRow, ...] = ()
    cells: tuple[CellRow, ...] = ()
    comparisons: tuple[ComparisonRow, ...] = ()
    runs: tuple[RunRow, ...] = ()
    claims: tuple[ClaimRow, ...] = ()
    #: the baseline's second seed set for the A/A rows (empty: no A/A measured)
    aa_seeds: tuple[int, ...] = ()
    claim_tests: tuple[ClaimTestRow, ...] = ()
    aa: tuple[AARow, ...] = ()
    #: the calls that ran the study (qexp.study.ledger) and the tuning runs' training time
    pieces: tuple[PieceRow, ...] = ()
    tuning_runs: int = 0
    tuning_train_s: float | None = None
    carry: tuple[CarryRow, ...] = ()
    spec_changes: tuple[SpecChangeRow, ...] = ()

    def comparison(
        self, setting: str, method: str, budget: float | None = None,
        optimizer: str | None = None,
    ) -> ComparisonRow | None:
        """The comparison of a cell with its baseline, if one was made. Without a budget and
        optimizer, a setting run under one condition only finds that one."""
        rows = [c for c in self.comparisons
                if c.kind == "baseline" and (c.setting, c.method) == (setting, method)]  # fmt: skip
        exact = next((c for c in rows if (c.budget, c.optimizer) == (budget, optimizer)), None)
        if exact is None and budget is None and optimizer is None and len(rows) == 1:
            return rows[0]
        return exact

    @property
    def controls(self) -> list[ComparisonRow]:
        """The planned control comparisons (spec ``controls``)."""
        return [c for c in self.comparisons if c.kind == "control"]

    @property
    def networks(self) -> dict[tuple[str, int], list[ReferenceRow]]:
        """The reference rows grouped by the network they name (run dir and seed): the rows of
        one network form (several budgets and optimizers) share one network per seed."""
        out: dict[tuple[str, int], list[ReferenceRow]] = {}
        for r in self.references:
            out.setdefault((r.run_dir, r.seed), []).append(r)
        return out

    @property
    def budgets(self) -> list[float]:
        """The training budgets the cells vary over (empty: not varied)."""
        return sorted({c.budget for c in self.cells if c.budget is not None})

    @property
    def optimizers(self) -> list[str]:
        """The optimizers the cells vary over (empty: not varied)."""
        return sorted({c.optimizer for c in self.cells if c.optimizer is not None})

    @classmethod
    def nested(cls, data: dict[str, Any]) -> dict[str, Any]:
        rows = {"references": ReferenceRow, "cells": CellRow, "comparisons": ComparisonRow,
                "runs": RunRow, "claims": ClaimRow, "claim_tests": ClaimTestRow, "aa": AARow,
                "pieces": PieceRow, "carry": CarryRow, "spec_changes": SpecChangeRow}  # fmt: skip
        out: dict[str, Any] = {k: tuple(row.from_json(r) for r in data.get(k) or [])
                               for k, row in rows.items()}  # fmt: skip
        for key in ("seeds", "aa_seeds"):
            out[key] = tuple(int(x) for x in data.get(key) or ())
        return out


def from_summary(spec: StudySpec, summary: dict[str, Any]) -> StudyResults:
    """The typed, analysed results of the dict ``qexp.study.pipeline.summarize`` returns
    (after ``portable_paths``): the pipeline's one-line switch to typed results."""
    return analyze(spec, StudyResults.from_json(_plain(summary)))


# -- the statistics ----------------------------------------------------------------------------
def claim_verdict(p_below_holm: float | None, p_gain_holm: float | None, alpha: float) -> str:
    """A claim's verdict from its two Holm-adjusted one-sided tests at family-wise ``alpha``:
    "not observed" (the gain is significantly below the claim and not shown above 0),
    "smaller gain" (above 0 but below the claim), "consistent" (above 0, not below the
    claim), "inconclusive" (neither test rejects)."""

    def rejects(p: float | None) -> bool:
        return p is not None and p < alpha

    below, gain = rejects(p_below_holm), rejects(p_gain_holm)
    if below:
        return CLAIM_SMALLER if gain else CLAIM_NOT_OBSERVED
    return CLAIM_CONSISTENT if gain else CLAIM_INCONCLUSIVE


def _accuracies(results: StudyResults, seeds: set[int]) -> dict[tuple[Condition, str], dict]:
    """(condition, method) -> {seed: test accuracy} of the completed runs at ``seeds``."""
    out: dict[tuple[Condition, str], dict[int, float]] = {}
    for r in results.runs:
        if r.status == "completed" and r.test_acc is not None and r.seed in seeds:
            out.setdefault((r.condition, r.method), {})[r.seed] = float(r.test_acc)
    return out


def _paired_diffs(cells: dict, condition: Condition, method: str, baseline: str) -> list[float]:
    accs, base = cells.get((condition, method), {}), cells.get((condition, baseline), {})
    return [accs[s] - base[s] for s in sorted(set(accs) & set(base))]


def analyze(spec: StudySpec, results: StudyResults, power: float = 0.8) -> StudyResults:
    """``results`` with its comparisons, claim tests and A/A rows (re)computed from its run
    rows (see the module docstring); baselines come from ``spec``."""
    baselines = {s.row: s.baseline for s in spec.settings}
    alpha = results.alpha
    cells = _accuracies(results, set(results.seeds))
    conditions = sorted({c for c, _ in cells}, key=lambda c: (str(c[0]), str(c[1]), str(c[2])))
    # one exploratory family: every method against its baseline, and the spec's controls
    pairs = [(cond, method, baselines.get(cond[0], "")) for cond, method in cells
             if method != baselines.get(cond[0])]  # fmt: skip
    # a control that names the condition's baseline repeats (or mirrors) a baseline test
    pairs += [(cond, c.method, c.against) for c in spec.controls for cond in conditions
              if baselines.get(cond[0]) not in (c.method, c.against)]  # fmt: skip
    paired = stats.compare_pairs(cells, pairs, alpha)
    comparisons = []
    for (cond, method, against), pr in paired.items():
        sd, n = pr.sd, pr.diff.n
        kind = "baseline" if against == baselines.get(cond[0]) else "control"
        comparisons.append(ComparisonRow(
            cond[0], method, against, n, pr.diff.mean, pr.diff.low, pr.diff.high,
            pr.p, pr.p_holm, pr.verdict, cond[1], cond[2], sd,
            pr.diff.mean / sd if sd > 0 else math.nan,
            stats.mde_paired(sd, n, alpha, power), stats.mde_normal(sd, n, alpha, power), kind,
        ))  # fmt: skip
    # confirmatory: every numeric claim at every condition of its setting it names
    members = [
        (claim, cond)
        for claim in results.claims if claim.diff is not None
        for cond in conditions
        if cond[0] == claim.setting and claim.budget in (None, cond[1])
        and claim.optimizer in (None, cond[2])
        and len(_paired_diffs(cells, cond, claim.method, baselines[cond[0]])) >= 2
    ]  # fmt: skip
    tests = stats.claim_family_tests(
        [_paired_diffs(cells, cond, c.method, baselines[cond[0]]) for c, cond in members],
        [float(c.diff) for c, _ in members],
        alpha,
    )
    claim_tests = [
        ClaimTestRow(
            c.method, cond[0], cond[1], cond[2], baselines[cond[0]], t.claimed, t.diff.n,
            t.diff.mean, t.sd, t.diff.low, t.diff.high, t.level, t.p_below, t.p_gain,
            t.p_below_holm, t.p_gain_holm, claim_verdict(finite(t.p_below_holm),
                                                         finite(t.p_gain_holm), alpha),
        )
        for (c, cond), t in zip(members, tests, strict=True)
    ]  # fmt: skip
    aa = []
    if results.aa_seeds:
        second = _accuracies(results, set(results.aa_seeds))
        for cond in conditions:
            base = baselines[cond[0]]
            first, other = cells.get((cond, base), {}), second.get((cond, base), {})
            if len(first) < 2 or len(other) < 2:
                continue
            pr = stats.paired_by_index(first, other)
            k = pr.diff.n
            aa.append(AARow(cond[0], cond[1], cond[2], base, tuple(sorted(first))[:k],
                            tuple(sorted(other))[:k], k, pr.diff.mean, pr.diff.low,
                            pr.diff.high, pr.p, pr.sd))  # fmt: skip
    typed = StudyResults.from_json(_plain({
        "comparisons": [c.to_json() for c in comparisons],
        "claim_tests": [t.to_json() for t in claim_tests],
        "aa": [r.to_json() for r in aa],
        "name": results.name, "seeds": results.seeds, "alpha": alpha,
    }))  # NaN -> None through JSON  # fmt: skip
    return replace(results, comparisons=typed.comparisons, claim_tests=typed.claim_tests,
                   aa=typed.aa)  # fmt: skip
