"""Finding run dirs on disk and grouping their results over seeds.

A run dir is any folder holding ``metrics.json`` (written by the trainer), or one that looks
like the start of a run (``.hydra/``, ``checkpoints/`` or a sweep marker) without it. Runs are
grouped by their whole config minus the seed, so runs that differ in anything else (learning
rate, epochs, a quantizer option...) are never averaged together; such differences show up as
extra columns.
"""

from __future__ import annotations

import json
import math
import os
import statistics
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qexp.record import RESULT_FREE_KEYS, RunRecord, RunStatus, config_fingerprint

#: the columns every group is labelled with (from metrics.json)
LABEL_KEYS = ("dataset", "model", "quantizer", "estimator", "w_bits", "a_bits")
#: config keys that do not change a run's results, or that are averaged over (seed)
IGNORED_KEYS = {"seed", *RESULT_FREE_KEYS}
#: config keys already shown by the label columns
_LABEL_CONFIG_KEYS = {
    "dataset.name",
    "model.name",
    "quantizer.name",
    "estimator.name",
    "bits",
    "w_bits",
    "a_bits",
}
#: metrics.json fields standing in for config keys when a run has no usable .hydra/config.yaml
_METRICS_AS_CONFIG = {
    "epochs": "trainer.epochs",
    "lr": "trainer.lr",
    "optimizer": "trainer.optimizer",
    "batch_size": "trainer.batch_size",
    "first_bits": "layers.first_bits",
    "last_bits": "layers.last_bits",
    "tag": "tag",
}
#: folders never searched for runs (checkpoints, Hydra/submitit bookkeeping, compare output)
_SKIP_DIRS = {"checkpoints", "tensorboard"}
_RUN_HINTS = (".hydra", "checkpoints", "sweep_job.json")


@dataclass
class Run:
    """One completed run."""

    path: Path
    metrics: dict[str, Any]
    #: flattened config minus IGNORED_KEYS and label keys (dotted keys -> JSON-able values)
    rest: dict[str, Any]

    def label(self) -> tuple[Any, ...]:
        return tuple(self.metrics.get(k) for k in LABEL_KEYS)


@dataclass
class Skipped:
    """A run dir that cannot be reported, and why."""

    path: Path
    reason: str


@dataclass
class Group:
    """Runs with the same config except the seed."""

    label: tuple[Any, ...]
    rest: dict[str, Any]
    runs: list[Run] = field(default_factory=list)
    #: values of the extra columns (keys that tell apart groups with the same label)
    extras: dict[str, Any] = field(default_factory=dict)
    #: the metrics.json key the group is summarised by (its runs all have it)
    metric: str = "test_acc"

    def __getattr__(self, name: str) -> Any:
        if name in LABEL_KEYS:
            return self.label[LABEL_KEYS.index(name)]
        raise AttributeError(name)

    @property
    def values(self) -> list[float]:
        """The metric of every run, in run order."""
        return [float(r.metrics[self.metric]) for r in self.runs]

    @property
    def n(self) -> int:
        return len(self.runs)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values)

    @property
    def std(self) -> float:
        """Sample standard deviation (ddof=1) over seeds; 0 for a single run."""
        return statistics.stdev(self.values) if self.n > 1 else 0.0

    @property
    def seeds(self) -> list[Any]:
        return sorted(r.metrics.get("seed") for r in self.runs)

    def mean_of(self, key: str) -> float | None:
        values = [r.metrics.get(key) for r in self.runs]
        values = [float(v) for v in values if isinstance(v, (int, float))]
        return statistics.fmean(values) if values else None

    @property
    def full_precision(self) -> bool:
        return self.w_bits == 32 and self.a_bits == 32


# -- finding runs ---------------------------------------------------------------------------
def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for k, v in node.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    if isinstance(node, list):
        node = json.dumps(node)
    return {prefix[:-1]: node}


def _config_rest(run_dir: Path, metrics: dict[str, Any]) -> dict[str, Any]:
    """The run's settings other than the seed and the label columns.

    Taken from the resolved config that ends the run's metrics.json when it is there and
    matches the record's config_hash (runs older than that record only the few settings that
    stand in for it).
    """
    plain = metrics.get("config")
    if not isinstance(plain, dict) or config_fingerprint(plain) != metrics.get("config_hash"):
        plain = None
    if isinstance(plain, dict):
        plain.pop("hydra", None)
        flat = _flatten(plain)
    else:
        flat = {new: metrics.get(old) for old, new in _METRICS_AS_CONFIG.items()}
    return {k: v for k, v in flat.items() if k not in IGNORED_KEYS and k not in _LABEL_CONFIG_KEYS}


def _has_number(metrics: dict[str, Any], key: str) -> bool:
    value = metrics.get(key)
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_metrics(run_dir: Path, metrics_wanted: tuple[str, ...]) -> Run | Skipped:
    path = run_dir / "metrics.json"
    try:
        metrics = json.loads(path.read_text())
    except FileNotFoundError:
        return Skipped(run_dir, "no metrics.json (never started training, or still starting)")
    except (OSError, UnicodeDecodeError) as exc:
        return Skipped(run_dir, f"metrics.json unreadable ({type(exc).__name__})")
    except ValueError:
        return Skipped(run_dir, "metrics.json is not valid JSON (half-written?)")
    if not isinstance(metrics, dict):
        return Skipped(run_dir, "metrics.json is not a JSON object")
    record = RunRecord.from_json(metrics)
    if not record.completed:
        status = record.status.value
        if record.status is RunStatus.RUNNING:
            status = "running (still training, or cut off)"
        elif record.reason:
            status = f"{status}: {record.reason}"
        return Skipped(run_dir, f"status {status}")
    metrics = record.to_json()
    if not any(_has_number(metrics, key) for key in metrics_wanted):
        return Skipped(run_dir, f"metrics.json has no {' or '.join(metrics_wanted)}")
    missing = [k for k in LABEL_KEYS if metrics.get(k) is None]
    if missing:
        return Skipped(run_dir, f"metrics.json lacks {', '.join(missing)}")
    return Run(run_dir, metrics, _config_rest(run_dir, metrics))


def find_runs(
    dirs: Iterable[Path], metrics: Sequence[str] = ("test_acc",)
) -> tuple[list[Run], list[Skipped]]:
    """Every run dir under ``dirs`` (at any depth): completed runs that report one of
    ``metrics`` (finite), and the rest with reasons."""
    found = _walk(dirs, tuple(metrics))
    return [r for r in found if isinstance(r, Run)], [s for s in found if isinstance(s, Skipped)]


def reported_metric(dirs: Iterable[Path], known: Sequence[str]) -> str | None:
    """The first of ``known`` that some completed run under ``dirs`` reports, or None."""
    runs, _ = find_runs(dirs, known)
    return next((k for k in known if any(_has_number(r.metrics, k) for r in runs)), None)


def _walk(dirs: Iterable[Path], metrics_wanted: tuple[str, ...]) -> list[Run | Skipped]:
    seen: set[Path] = set()
    found: list[Run | Skipped] = []
    for top in dirs:
        for root, subdirs, files in os.walk(top):
            here = Path(root)
            names = set(files) | set(subdirs)
            subdirs[:] = sorted(d for d in subdirs if not d.startswith(".") and d not in _SKIP_DIRS)
            if "metrics.json" not in names and not any(h in names for h in _RUN_HINTS):
                continue
            key = here.resolve()
            if key in seen:
                continue
            seen.add(key)
            found.append(_check_metrics(here, metrics_wanted))
    return found


# -- grouping -------------------------------------------------------------------------------
def _key(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def group_runs(runs: list[Run], metric: str = "test_acc") -> tuple[list[Group], list[str]]:
    """Groups of runs equal but for the seed, summarised by ``metric``, sorted; and the extra
    column names."""
    groups: dict[tuple[Any, ...], Group] = {}
    for run in runs:
        key = (run.label(), _key(run.rest))
        if key not in groups:
            groups[key] = Group(run.label(), run.rest, metric=metric)
        groups[key].runs.append(run)
    # an extra column for every setting that differs between groups sharing a label
    by_label: dict[tuple[Any, ...], list[Group]] = {}
    for g in groups.values():
        by_label.setdefault(g.label, []).append(g)
    extra_keys: set[str] = set()
    for same in by_label.values():
        if len(same) < 2:
            continue
        keys = set().union(*(g.rest for g in same))
        for k in keys:
            if len({_key(g.rest.get(k, "-")) for g in same}) > 1:
                extra_keys.add(k)
    extras = sorted(extra_keys)
    for g in groups.values():
        g.extras = {k: g.rest.get(k, "-") for k in extras}
    ordered = sorted(
        groups.values(),
        key=lambda g: (
            [str(g.label[i]) for i in range(4)],
            [_key(v) for v in g.extras.values()],
            g.w_bits,
            g.a_bits,
        ),
    )
    return ordered, extras


def skipped_reasons(skipped: list[Skipped]) -> str:
    """One line: how many runs were skipped, for which reasons."""
    counts = Counter(s.reason.split(" (")[0] for s in skipped)
    parts = [f"{n} {reason}" for reason, n in counts.most_common()]
    return f"skipped: {len(skipped)} runs ({'; '.join(parts)})"
