"""The statistics of a study: per-cell intervals, paired differences, Holm, verdicts.

Distributions come from scipy (Student's t); only the bookkeeping is written here. No torch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

BETTER, NO_EVIDENCE, WORSE = "better", "no evidence", "worse"


@dataclass(frozen=True)
class Interval:
    """A mean with its two-sided confidence interval (nan bounds with fewer than 2 values)."""

    mean: float
    low: float
    high: float
    n: int


@dataclass(frozen=True)
class Paired:
    """A method minus the baseline over the same seeds."""

    diff: Interval
    p: float  # two-sided p-value of the paired t-test (nan when undefined)
    p_holm: float = math.nan
    verdict: str = NO_EVIDENCE


def mean_interval(values: Sequence[float], level: float = 0.95) -> Interval:
    """Mean and Student-t confidence interval of ``values``."""
    x = np.asarray(values, dtype=float)
    n = int(x.size)
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, 0)
    mean = float(x.mean())
    if n < 2:
        return Interval(mean, math.nan, math.nan, n)
    sem = float(stats.sem(x))
    if sem == 0.0:
        return Interval(mean, mean, mean, n)
    low, high = stats.t.interval(level, n - 1, loc=mean, scale=sem)
    return Interval(mean, float(low), float(high), n)


def paired_difference(
    method: Sequence[float], baseline: Sequence[float], level: float = 0.95
) -> Paired:
    """``method - baseline`` seed by seed: mean difference, its interval, paired t-test p."""
    a, b = np.asarray(method, dtype=float), np.asarray(baseline, dtype=float)
    if a.shape != b.shape:
        raise ValueError("paired values need the same seeds on both sides")
    diff = mean_interval(a - b, level)
    d = a - b
    if d.size < 2:
        return Paired(diff, math.nan)
    if np.all(d == d[0]):  # no spread: t is 0/0 (no difference) or infinite (the same gain)
        return Paired(diff, math.nan if d[0] == 0 else 0.0)
    return Paired(diff, float(stats.ttest_rel(a, b).pvalue))


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (nan stays nan and is not counted)."""
    idx = [i for i, p in enumerate(pvalues) if not math.isnan(p)]
    m = len(idx)
    adjusted = [math.nan] * len(pvalues)
    running = 0.0
    for rank, i in enumerate(sorted(idx, key=lambda i: pvalues[i])):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted


def verdict(diff: float, p_adjusted: float, alpha: float = 0.05) -> str:
    """better / worse when the Holm-adjusted p is below ``alpha``, else no evidence."""
    if math.isnan(p_adjusted) or p_adjusted >= alpha:
        return NO_EVIDENCE
    return BETTER if diff > 0 else WORSE


def compare_all(
    cells: dict[tuple[str, str], dict[int, float]],
    baselines: dict[str, str],
    alpha: float = 0.05,
    level: float = 0.95,
) -> dict[tuple[str, str], Paired]:
    """Paired comparison of every (setting, method) cell with its setting's baseline, on the
    seeds both completed, Holm-corrected over all comparisons together. ``cells`` maps
    (setting, method) to {seed: accuracy}; cells with fewer than two shared seeds are left out.
    """
    raw: dict[tuple[str, str], Paired] = {}
    for (setting, method), accs in cells.items():
        base = cells.get((setting, baselines.get(setting, "")))
        if method == baselines.get(setting) or base is None:
            continue
        seeds = sorted(set(accs) & set(base))
        if len(seeds) >= 2:
            raw[(setting, method)] = paired_difference(
                [accs[s] for s in seeds], [base[s] for s in seeds], level
            )
    keys = list(raw)
    adjusted = holm([raw[k].p for k in keys])
    return {
        k: Paired(raw[k].diff, raw[k].p, adj, verdict(raw[k].diff.mean, adj, alpha))
        for k, adj in zip(keys, adjusted, strict=True)
    }
