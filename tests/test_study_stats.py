"""Statistics of `qexp study`: intervals, paired tests, Holm, verdicts (scipy and by hand)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from qexp.study.stats import (
    BETTER,
    NO_EVIDENCE,
    WORSE,
    compare_all,
    holm,
    mean_interval,
    paired_difference,
    verdict,
)

#: Student's t, 97.5% quantile with 4 degrees of freedom, from a printed t table
T_975_DF4 = 2.776445


def test_mean_interval_by_hand():
    ci = mean_interval([1, 2, 3, 4, 5])
    # mean 3, sd sqrt(2.5), sem sqrt(2.5 / 5) = sqrt(0.5)
    half = T_975_DF4 * math.sqrt(0.5)
    assert ci.mean == 3 and ci.n == 5
    assert ci.low == pytest.approx(3 - half, abs=1e-6)
    assert ci.high == pytest.approx(3 + half, abs=1e-6)


def test_paired_difference_by_hand():
    # differences 1, 1, 2.5: mean 1.5, sd sqrt(0.75), t = 1.5 / (sqrt(0.75) / sqrt(3)) = 3;
    # with 2 degrees of freedom the two-sided p is 1 - t / sqrt(2 + t^2) (closed form for df=2)
    result = paired_difference([1, 2, 3.5], [0, 1, 1])
    assert result.diff.mean == pytest.approx(1.5)
    assert result.p == pytest.approx(1 - 3 / math.sqrt(11), abs=1e-9)


def test_paired_difference_matches_scipy_on_known_numbers():
    rng = np.random.default_rng(3)
    base = rng.uniform(0.8, 0.9, size=7)
    method = base + rng.normal(0.01, 0.005, size=7)
    result = paired_difference(method, base)
    ref = stats.ttest_rel(method, base)
    ci = ref.confidence_interval(0.95)
    assert result.p == pytest.approx(ref.pvalue, rel=1e-12)
    assert result.diff.low == pytest.approx(ci.low, rel=1e-9)
    assert result.diff.high == pytest.approx(ci.high, rel=1e-9)
    one = mean_interval(base)
    ci1 = stats.ttest_1samp(base, 0).confidence_interval(0.95)
    assert (one.low, one.high) == (pytest.approx(ci1.low), pytest.approx(ci1.high))


def test_degenerate_cases():
    assert math.isnan(mean_interval([0.5]).low)
    assert math.isnan(paired_difference([0.5, 0.6], [0.5, 0.6]).p)  # no difference at all
    assert paired_difference([0.6, 0.7], [0.5, 0.6]).p == 0.0  # the same gain on every seed
    with pytest.raises(ValueError):
        paired_difference([1, 2], [1])


def test_holm_by_hand():
    # sorted 0.01, 0.03, 0.04 times 3, 2, 1 -> 0.03, 0.06, 0.04 -> monotone 0.03, 0.06, 0.06
    adjusted = holm([0.01, 0.04, 0.03, math.nan])
    assert adjusted[:3] == pytest.approx([0.03, 0.06, 0.06])
    assert math.isnan(adjusted[3])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])  # capped at 1


def test_verdicts():
    assert verdict(0.01, 0.01) == BETTER
    assert verdict(-0.01, 0.01) == WORSE
    assert verdict(0.05, 0.2) == NO_EVIDENCE
    assert verdict(0.05, math.nan) == NO_EVIDENCE


def test_compare_all_pairs_on_shared_seeds_and_corrects_over_all():
    base = {0: 0.80, 1: 0.82, 2: 0.81, 3: 0.83}
    good = {0: 0.85, 1: 0.871, 2: 0.859, 3: 0.881}  # about +5 points on every seed
    bad = {0: 0.70, 1: 0.73, 2: 0.70}  # seed 3 missing: paired on seeds 0-2
    same = dict(base)
    cells = {("w2", "ste"): base, ("w2", "good"): good, ("w2", "bad"): bad, ("w2", "same"): same}
    out = compare_all(cells, {"w2": "ste"})
    assert set(out) == {("w2", "good"), ("w2", "bad"), ("w2", "same")}
    assert out[("w2", "bad")].diff.n == 3
    raw_good = stats.ttest_rel(list(good.values()), list(base.values())).pvalue
    raw_bad = stats.ttest_rel([0.70, 0.73, 0.70], [0.80, 0.82, 0.81]).pvalue
    expected = holm([raw_good, raw_bad, math.nan])
    assert out[("w2", "good")].p_holm == pytest.approx(expected[0])
    assert out[("w2", "bad")].p_holm == pytest.approx(expected[1])
    assert out[("w2", "good")].verdict == BETTER
    assert out[("w2", "bad")].verdict == WORSE
    assert out[("w2", "same")].verdict == NO_EVIDENCE


def test_claim_position_against_the_interval():
    from qexp.study.report import claim_position

    assert claim_position(0.0, -0.01, 0.02) == "inside"
    assert claim_position(0.02, -0.01, 0.02) == "inside"  # the interval's ends count as inside
    assert claim_position(0.03, -0.01, 0.02) == "above"
    assert claim_position(-0.02, -0.01, 0.02) == "below"
    assert claim_position(None, -0.01, 0.02) == "–"  # no number claimed
    assert claim_position(0.01, None, None) == "–"  # one seed: no interval
