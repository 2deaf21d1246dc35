"""The statistics of a study: per-cell intervals, paired differences, Holm, verdicts; effect
sizes and minimum detectable effects; the confirmatory one-sided tests of claimed gains; A/A.

Distributions come from scipy (Student's t); only the bookkeeping is written here. No torch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

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
    sd: float = math.nan  # sample SD of the paired differences (nan below 2 pairs)


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
    sd = float(d.std(ddof=1))
    if np.all(d == d[0]):  # no spread: t is 0/0 (no difference) or infinite (the same gain)
        return Paired(diff, math.nan if d[0] == 0 else 0.0, sd=0.0)
    return Paired(diff, float(stats.ttest_rel(a, b).pvalue), sd=sd)


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
    cells: dict[tuple[Any, str], dict[int, float]],
    baselines: dict[Any, str],
    alpha: float = 0.05,
    level: float = 0.95,
) -> dict[tuple[Any, str], Paired]:
    """Paired comparison of every (setting, method) cell with its setting's baseline, on the
    seeds both completed, Holm-corrected over all comparisons together. ``cells`` maps
    (setting, method) to {seed: accuracy}, where a setting is any hashable key (a setting's
    name, or a (setting, budget, optimizer) condition) that ``baselines`` maps to its baseline;
    cells with fewer than two shared seeds are left out.
    """
    pairs = [(setting, method, baselines.get(setting, "")) for setting, method in cells
             if method != baselines.get(setting)]  # fmt: skip
    return {(s, m): p for (s, m, _), p in compare_pairs(cells, pairs, alpha, level).items()}


def compare_pairs(
    cells: dict[tuple[Any, str], dict[int, float]],
    pairs: Sequence[tuple[Any, str, str]],
    alpha: float = 0.05,
    level: float = 0.95,
) -> dict[tuple[Any, str, str], Paired]:
    """Paired comparison of each (setting, method, against) in ``pairs``: ``method`` minus
    ``against`` on the seeds both completed in that setting, Holm-corrected over all pairs
    together; pairs with fewer than two shared seeds are left out."""
    raw: dict[tuple[Any, str, str], Paired] = {}
    for setting, method, against in pairs:
        accs, base = cells.get((setting, method)), cells.get((setting, against))
        if accs is None or base is None:
            continue
        seeds = sorted(set(accs) & set(base))
        if len(seeds) >= 2:
            raw[(setting, method, against)] = paired_difference(
                [accs[s] for s in seeds], [base[s] for s in seeds], level
            )
    keys = list(raw)
    adjusted = holm([raw[k].p for k in keys])
    return {
        k: Paired(raw[k].diff, raw[k].p, adj, verdict(raw[k].diff.mean, adj, alpha), raw[k].sd)
        for k, adj in zip(keys, adjusted, strict=True)
    }


# -- effect sizes and power --------------------------------------------------------------------
def cohen_dz(diffs: Sequence[float]) -> float:
    """Cohen's d_z of paired differences: their mean over their sample SD (nan when the SD
    is 0 or undefined)."""
    d = np.asarray(diffs, dtype=float)
    if d.size < 2:
        return math.nan
    sd = float(d.std(ddof=1))
    return float(d.mean()) / sd if sd > 0 else math.nan


def paired_power(effect: float, sd: float, n: int, alpha: float = 0.05) -> float:
    """Power of the two-sided paired t-test at level ``alpha`` with ``n`` pairs when the true
    mean difference is ``effect`` and the SD of differences ``sd``: P(|T| > t_crit) for T
    noncentral t with n - 1 degrees of freedom and noncentrality effect * sqrt(n) / sd."""
    df = n - 1
    crit = float(stats.t.ppf(1 - alpha / 2, df))
    nc = effect * math.sqrt(n) / sd
    lower = float(stats.nct.cdf(-crit, df, nc))  # the far tail: nan (underflow) for large nc
    return float(stats.nct.sf(crit, df, nc)) + (0.0 if math.isnan(lower) else lower)


def mde_paired(sd: float, n: int, alpha: float = 0.05, power: float = 0.8) -> float:
    """Minimum detectable effect: the smallest true mean paired difference the two-sided
    paired t-test (level ``alpha``, ``n`` pairs, SD of differences ``sd``) detects with
    probability ``power`` (noncentral t, solved numerically). nan below 2 pairs or sd 0."""
    if n < 2 or not sd > 0:
        return math.nan
    from scipy.optimize import brentq

    high = sd
    while paired_power(high, sd, n, alpha) < power:
        high *= 2
    return float(brentq(lambda e: paired_power(e, sd, n, alpha) - power, 0.0, high, xtol=1e-12))


def mde_normal(sd: float, n: int, alpha: float = 0.05, power: float = 0.8) -> float:
    """The closed-form normal approximation of :func:`mde_paired`:
    (z_{1 - alpha/2} + z_{power}) * sd / sqrt(n); smaller than the t version for few pairs."""
    if n < 1 or not sd > 0:
        return math.nan
    z = stats.norm.ppf
    return float((z(1 - alpha / 2) + z(power)) * sd / math.sqrt(n))


# -- confirmatory tests of claimed gains -------------------------------------------------------
@dataclass(frozen=True)
class ClaimTest:
    """The two one-sided paired t-tests of a claimed gain g on paired differences d.

    ``p_below``: H0 "the true gain is at least g" against "it is below g" (small: the claimed
    gain is not observed). ``p_gain``: H0 "the true gain is at most 0" against "it is above 0"
    (small: there is a gain). Holm-adjusted values come from :func:`claim_family_tests`.
    """

    claimed: float
    diff: Interval  # the mean difference and its family-adjusted two-sided interval
    level: float  # that interval's level
    sd: float
    p_below: float
    p_gain: float
    p_below_holm: float = math.nan
    p_gain_holm: float = math.nan


def one_sided_p(diffs: Sequence[float], value: float, alternative: str) -> float:
    """p of the one-sample t-test of the mean of ``diffs`` against ``value``, one-sided
    (``alternative`` "less": H1 mean < value; "greater": H1 mean > value). With no spread the
    answer is exact: 0 when every difference lies on H1's side, else 1."""
    d = np.asarray(diffs, dtype=float)
    if d.size < 2:
        return math.nan
    if np.all(d == d[0]):
        on_h1 = d[0] < value if alternative == "less" else d[0] > value
        return 0.0 if on_h1 else 1.0
    return float(stats.ttest_1samp(d, value, alternative=alternative).pvalue)


def claim_family_tests(
    diffs: Sequence[Sequence[float]], claimed: Sequence[float], alpha: float = 0.05
) -> list[ClaimTest]:
    """The confirmatory family: for claim i (paired differences ``diffs[i]``, claimed gain
    ``claimed[i]``) both one-sided tests, Holm-corrected over the 2 x len(claims) tests of the
    family only. Each interval is the two-sided Student-t interval at level 1 - 2 alpha / m
    (m = the family's number of tests): each end is the one-sided bound at alpha / m, the
    Bonferroni bound matching each test (Holm rejects at least where Bonferroni does)."""
    m = 2 * len(claimed)
    level = 1 - 2 * alpha / m if m else 0.95
    raw = []
    for d, g in zip(diffs, claimed, strict=True):
        arr = np.asarray(d, dtype=float)
        sd = float(arr.std(ddof=1)) if arr.size > 1 else math.nan
        raw.append(
            ClaimTest(g, mean_interval(arr, level), level, sd, one_sided_p(arr, g, "less"),
                      one_sided_p(arr, 0.0, "greater"))
        )  # fmt: skip
    adjusted = holm([p for t in raw for p in (t.p_below, t.p_gain)])
    return [
        ClaimTest(t.claimed, t.diff, t.level, t.sd, t.p_below, t.p_gain, adjusted[2 * i],
                  adjusted[2 * i + 1])
        for i, t in enumerate(raw)
    ]  # fmt: skip


def paired_by_index(first: dict[int, float], second: dict[int, float]) -> Paired:
    """An A/A comparison: ``second`` minus ``first`` (the same method on two disjoint seed
    sets), the i-th smallest seed of one paired with the i-th of the other; the unpaired
    surplus of the longer set is left out."""
    a = [first[s] for s in sorted(first)]
    b = [second[s] for s in sorted(second)]
    k = min(len(a), len(b))
    return paired_difference(b[:k], a[:k])
