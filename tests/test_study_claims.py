"""The citable study's statistics: one-sided tests of claimed gains (Holm within the
confirmatory family), minimum detectable effects, A/A rows, budgets and optimizers, and the
report's words for a rejected claim."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from qexp.errors import QexpError
from qexp.study import figures, report
from qexp.study.results import (
    CLAIM_CONSISTENT,
    CLAIM_INCONCLUSIVE,
    CLAIM_NOT_OBSERVED,
    CLAIM_SMALLER,
    CarryRow,
    ClaimRow,
    StudyResults,
    TrialRow,
    analyze,
    claim_verdict,
    condition_words,
)
from qexp.study.spec import parse_spec
from qexp.study.stats import (
    claim_family_tests,
    cohen_dz,
    holm,
    mde_normal,
    mde_paired,
    one_sided_p,
    paired_by_index,
    paired_power,
)

#: standard normal quantiles from a printed table: z(0.975) and z(0.80)
Z_975, Z_80 = 1.959964, 0.841621


def test_one_sided_p_by_hand_and_against_scipy():
    d = [0.010, -0.004, 0.002, 0.006, -0.001]
    n, mean, sd = 5, float(np.mean(d)), float(np.std(d, ddof=1))
    g = 0.009
    t_below = (mean - g) / (sd / math.sqrt(n))
    assert one_sided_p(d, g, "less") == pytest.approx(stats.t.cdf(t_below, n - 1), rel=1e-12)
    t_gain = mean / (sd / math.sqrt(n))
    assert one_sided_p(d, 0.0, "greater") == pytest.approx(stats.t.sf(t_gain, n - 1), rel=1e-12)
    # df = 2 has a closed form: P(T < t) = 1/2 + t / (2 sqrt(2 + t^2))
    three = [0.0, 0.01, 0.005]
    t3 = (0.005 - 0.02) / (0.005 / math.sqrt(3))
    assert one_sided_p(three, 0.02, "less") == pytest.approx(0.5 + t3 / (2 * math.sqrt(2 + t3**2)))
    # no spread: exact answers
    assert one_sided_p([0.01, 0.01], 0.02, "less") == 0.0
    assert one_sided_p([0.03, 0.03], 0.02, "less") == 1.0


def test_claim_family_is_holm_within_itself_only():
    rng = np.random.default_rng(7)
    diffs = [rng.normal(-0.02, 0.01, 5), rng.normal(0.012, 0.004, 5)]
    claimed = [0.009, 0.015]
    tests = claim_family_tests(diffs, claimed, alpha=0.05)
    raw = [p for d, g in zip(diffs, claimed, strict=True)
           for p in (stats.ttest_1samp(d, g, alternative="less").pvalue,
                     stats.ttest_1samp(d, 0, alternative="greater").pvalue)]  # fmt: skip
    adjusted = holm(raw)  # 4 tests: the family, not the study's other comparisons
    got = [p for t in tests for p in (t.p_below_holm, t.p_gain_holm)]
    assert got == pytest.approx(adjusted)
    # the interval: two-sided at 1 - 2 alpha / m, i.e. each end a one-sided alpha / 4 bound
    t0 = tests[0]
    assert t0.level == pytest.approx(1 - 0.05 / 2)
    half = stats.t.ppf(1 - 0.05 / 4, 4) * np.std(diffs[0], ddof=1) / math.sqrt(5)
    assert t0.diff.high == pytest.approx(np.mean(diffs[0]) + half)


def test_claim_verdicts():
    assert claim_verdict(0.01, 0.9, 0.05) == CLAIM_NOT_OBSERVED
    assert claim_verdict(0.01, 0.01, 0.05) == CLAIM_SMALLER
    assert claim_verdict(0.5, 0.01, 0.05) == CLAIM_CONSISTENT
    assert claim_verdict(0.5, 0.5, 0.05) == CLAIM_INCONCLUSIVE
    assert claim_verdict(None, None, 0.05) == CLAIM_INCONCLUSIVE


def test_mde_closed_form_by_hand_and_noncentral_t_by_simulation():
    assert mde_normal(0.01, 4) == pytest.approx((Z_975 + Z_80) * 0.01 / 2, rel=1e-6)
    sd, n = 0.01, 5
    mde = mde_paired(sd, n)
    assert paired_power(mde, sd, n) == pytest.approx(0.8, abs=1e-9)
    # independent check: simulated paired t-tests at a true difference of mde reject 80%
    rng = np.random.default_rng(0)
    d = rng.normal(mde, sd, size=(200_000, n))
    t = d.mean(axis=1) / (d.std(axis=1, ddof=1) / math.sqrt(n))
    rejected = np.mean(np.abs(t) > stats.t.ppf(0.975, n - 1))
    assert rejected == pytest.approx(0.8, abs=0.005)
    # few pairs: the t version needs a larger effect than the normal approximation; many
    # pairs: the two agree
    assert mde > mde_normal(sd, n)
    assert mde_paired(sd, 2000) == pytest.approx(mde_normal(sd, 2000), rel=2e-3)
    assert math.isnan(mde_paired(0.0, 5)) and math.isnan(mde_paired(0.01, 1))
    assert cohen_dz([1.0, 2.0, 3.0]) == pytest.approx(2.0)  # mean 2, sd 1


def test_paired_by_index():
    first = {0: 0.80, 1: 0.82, 2: 0.81}
    second = {12: 0.83, 10: 0.80, 11: 0.815, 13: 0.9}  # one surplus seed: left out
    result = paired_by_index(first, second)
    expected = stats.ttest_rel([0.80, 0.815, 0.83], [0.80, 0.82, 0.81])
    assert result.diff.n == 3
    assert result.diff.mean == pytest.approx(np.mean([0.0, -0.005, 0.02]))
    assert result.p == pytest.approx(expected.pvalue)


# -- a small study's results, end to end through analyze and the report -----------------------
SPEC = {
    "name": "t", "seeds": [0, 1, 2, 3], "tuning": {"trials": 1},
    "settings": [{"key": "w1a1", "bits": 1, "baseline": "base"},
                 {"key": "w2a2", "bits": 2, "baseline": "base"}],
    "methods": {"base": {}, "claimed": {}, "other": {}},
    "claims": [{"method": "claimed", "setting": "w1a1", "text": "+2 points", "diff": 0.02}],
}  # fmt: skip
BASE = [0.80, 0.82, 0.81, 0.83]
AA = [0.805, 0.815, 0.812, 0.826]  # the baseline on seeds 10-13
GAINS = {"claimed": [0.001, 0.002, -0.001, 0.0015], "other": [0.02, 0.03, 0.025, 0.028]}


def _results(budgets=(None,), optimizers=(None,), aa=True) -> StudyResults:
    runs, cells = [], []
    for setting in ("w1a1", "w2a2"):
        for budget in budgets:
            for opt in optimizers:
                scale = 1.0 if budget is None else budget / max(budgets)
                for method in ("base", "claimed", "other"):
                    gains = GAINS.get(method, [0.0] * 4)
                    accs = [scale * (b + g) for b, g in zip(BASE, gains, strict=True)]
                    for seed, acc in enumerate(accs):
                        runs.append({"setting": setting, "method": method, "seed": seed,
                                     "status": "completed", "test_acc": acc,
                                     "train_time_s": 10.0 * (budget or 1) * (2 if method == "other"
                                                                            else 1),
                                     "budget": budget, "optimizer": opt})  # fmt: skip
                    cells.append({"setting": setting, "title": setting, "bits": int(setting[1]),
                                  "method": method, "status": "completed", "n": 4,
                                  "mean": float(np.mean(accs)), "low": None, "high": None,
                                  "train_time_s": 10.0 * (budget or 1) * (2 if method == "other"
                                                                         else 1),
                                  "budget": budget, "optimizer": opt,
                                  "space": {"trainer.lr": "[0.1, 1]"}})  # fmt: skip
                if aa:
                    for i, acc in enumerate(AA):
                        runs.append({"setting": setting, "method": "base", "seed": 10 + i,
                                     "status": "completed", "test_acc": scale * acc,
                                     "budget": budget, "optimizer": opt})  # fmt: skip
    refs = [{"setting": s, "seed": 0, "run_dir": f"ref-{s}", "test_acc": acc,
             "model": {"name": "cnn", "activation": act}}
            for s, acc, act in (("w1a1", 0.9, "hardtanh"), ("w2a2", 0.92, "relu"))]  # fmt: skip
    data = {"name": "t", "seeds": [0, 1, 2, 3], "alpha": 0.05, "references": refs,
            "cells": cells, "runs": runs, "claims": SPEC["claims"],
            "aa_seeds": [10, 11, 12, 13] if aa else []}  # fmt: skip
    return analyze(parse_spec(SPEC), StudyResults.from_json(data))


def test_analyze_claims_aa_and_exploratory_families():
    results = _results()
    # exploratory: 2 settings x 2 methods, Holm over those 4 only
    assert len(results.comparisons) == 4
    other = results.comparison("w1a1", "other")
    d = np.array(GAINS["other"])
    assert other.d_z == pytest.approx(d.mean() / d.std(ddof=1))
    assert other.mde == pytest.approx(mde_paired(d.std(ddof=1), 4))
    # confirmatory: the one numeric claim, both tests, Holm over 2
    (test,) = results.claim_tests
    g = np.array(GAINS["claimed"])
    raw = [stats.ttest_1samp(g, 0.02, alternative="less").pvalue,
           stats.ttest_1samp(g, 0.0, alternative="greater").pvalue]  # fmt: skip
    assert [test.p_below_holm, test.p_gain_holm] == pytest.approx(holm(raw))
    assert test.verdict == CLAIM_NOT_OBSERVED
    # A/A: the baseline on seeds 10-13 minus seeds 0-3, by index
    aa = {r.setting: r for r in results.aa}
    assert aa["w1a1"].seeds == (0, 1, 2, 3) and aa["w1a1"].other_seeds == (10, 11, 12, 13)
    assert aa["w1a1"].diff == pytest.approx(np.mean(np.array(AA) - np.array(BASE)))
    assert aa["w1a1"].p == pytest.approx(stats.ttest_rel(AA, BASE).pvalue)
    # the A/A seeds never leak into the comparisons: n stays 4
    assert all(c.n == 4 for c in results.comparisons)
    # JSON round trip of the new rows
    again = StudyResults.from_json(json.loads(json.dumps(results.to_json())))
    assert again == results


def test_report_words_for_a_rejected_claim_and_aa_row():
    results = _results()
    text = report.markdown(parse_spec(SPEC), results)
    assert "not observed under w1a1: the gain is below the claimed +2.00 points" in text
    assert "not reproduced" not in text
    assert "## A/A: the baseline against itself" in text and "[0, 1, 2, 3] vs [10, 11" in text
    assert "common knobs only" in text
    # the method that costs twice the time: the time ratio, no invented equal-time number
    assert "×2.0 time: not run at the baseline's" in text


def test_budgets_and_optimizers(tmp_path: Path):
    results = _results(budgets=(1, 2), optimizers=("adam", "sgd"), aa=False)
    assert results.budgets == [1, 2] and results.optimizers == ["adam", "sgd"]
    # one comparison per (setting, budget, optimizer) and non-baseline method
    assert len(results.comparisons) == 2 * 2 * 2 * 2
    # a claim without budget / optimizer is tested at every condition of its setting
    assert len(results.claim_tests) == 4
    assert {(t.budget, t.optimizer) for t in results.claim_tests} == {
        (b, o) for b in (1, 2) for o in ("adam", "sgd")}  # fmt: skip
    text = report.markdown(parse_spec(SPEC), results)
    assert "not observed under w1a1, budget 2, adam" in text
    assert "| budget | optimizer |" in text
    # "other" at budget 2 takes 40 s, the baseline at budget 2 20 s: the method's budget-1
    # run took exactly 20 s, so its equal-time accuracy is its budget-1 mean
    cell = next(c for c in results.cells if (c.setting, c.method, c.budget, c.optimizer)
                == ("w1a1", "other", 2, "adam"))  # fmt: skip
    at_1 = next(c for c in results.cells if (c.setting, c.method, c.budget, c.optimizer)
                == ("w1a1", "other", 1, "adam"))  # fmt: skip
    reading = report.equal_time_reading(results, cell, "base")
    assert reading == f"{100 * at_1.mean:.2f} (interpolated)"
    # at budget 1 "other" (20 s) outlasts the baseline (10 s) and was run no shorter: the
    # baseline's budget-2 run took exactly 20 s, so the baseline at this time is its mean
    base_2 = next(c for c in results.cells if (c.setting, c.method, c.budget, c.optimizer)
                  == ("w1a1", "base", 2, "adam"))  # fmt: skip
    reading = report.equal_time_reading(results, at_1, "base")
    assert reading == f"×2.0 time; baseline at this time {100 * base_2.mean:.2f} (interpolated)"
    # cells.csv: each cell beside the comparison of its own budget and optimizer
    rows = {(r["setting"], r["method"], r["budget"], r["optimizer"]): r
            for r in report.cell_rows(results)}  # fmt: skip
    for comp in results.comparisons:
        row = rows[(comp.setting, comp.method, comp.budget, comp.optimizer)]
        assert row["diff"] == pytest.approx(comp.diff) and row["p_holm"] == comp.p_holm
    paths = report.write_all(parse_spec(SPEC), tmp_path, results)
    assert paths["budget_figure"].read_bytes()[:4] == b"\x89PNG"


def test_full_precision_references_per_network_form():
    forms = figures.reference_forms(_results())
    assert [(label, settings, accs) for label, settings, accs in forms] == [
        ("full precision, hardtanh (w1a1)", ["w1a1"], [0.9]),
        ("full precision, relu (w2a2)", ["w2a2"], [0.92]),
    ]
    # rows that share one network (several budgets of a row) count it once in the line
    results = _results()
    twice = dataclasses.replace(results.references[0], setting="w1a1-long", test_acc=0.9)
    other_seed = dataclasses.replace(results.references[0], seed=1, test_acc=0.8)
    results = dataclasses.replace(
        results, references=(*results.references, twice, other_seed))
    (label, settings, accs), _ = figures.reference_forms(results)
    assert settings == ["w1a1", "w1a1-long"] and sorted(accs) == [0.8, 0.9]


def test_a_reference_shared_by_several_rows_is_listed_once():
    spec = parse_spec({**SPEC, "settings": [
        {"key": "w1a1", "bits": 1, "baseline": "base"},
        {"key": "w1a1-long", "group": "w1a1", "bits": 1, "baseline": "base", "budget": 9},
        {"key": "w1a1-scratch", "bits": 1, "baseline": "base", "init": "scratch"},
        {"key": "w2a2", "bits": 2, "baseline": "base"}]})  # fmt: skip
    results = _results()
    one = results.references[0]
    shared = [dataclasses.replace(one, setting=s) for s in ("w1a1", "w1a1", "w1a1-scratch")]
    other = [dataclasses.replace(r, run_dir="y") for r in results.references[1:]]
    results = dataclasses.replace(results, references=(*shared, *other))
    text = report.markdown(spec, results)
    table = [line for line in text.splitlines() if line.startswith("| w")]
    assert [line.split(" | ")[0] for line in table[:2]] == [
        "| w1a1, w1a1-scratch (float line only)", "| w2a2"]
    assert "w1a1-scratch: trained from scratch" in text
    assert "2 of the 2 networks were still gaining" in text


def test_old_results_json_regenerates_the_report():
    docs = Path(__file__).resolve().parents[1] / "docs" / "study_2epoch"
    from qexp.study.runs import load_spec

    spec = load_spec("fashion_reference")
    results = analyze(spec, StudyResults.from_json(json.loads((docs / "results.json").read_text())))
    text = report.markdown(spec, results)
    assert "| budget |" not in text  # an old study: no budget or optimizer columns
    assert "A/A" in text and "Not measured" in text
    assert "not observed under w1a1" in text and "not reproduced" not in text


def test_controls_join_the_exploratory_family():
    """A control (``other`` against ``claimed``): paired by seed, Holm over the baseline
    comparisons and the controls together, against scipy."""
    spec = parse_spec({**SPEC, "controls": [{"method": "other", "against": "claimed",
                                             "text": "same quantizer, no partner"}]})
    plain = _results()
    results = analyze(spec, plain)
    controls = {c.setting: c for c in results.controls}
    assert set(controls) == {"w1a1", "w2a2"} and len(results.comparisons) == 6
    diffs = np.array(GAINS["other"]) - np.array(GAINS["claimed"])
    row = controls["w1a1"]
    assert (row.method, row.baseline, row.kind, row.n) == ("other", "claimed", "control", 4)
    assert row.diff == pytest.approx(diffs.mean())
    other = [b + g for b, g in zip(BASE, GAINS["other"], strict=True)]
    claimed = [b + g for b, g in zip(BASE, GAINS["claimed"], strict=True)]
    assert row.p == pytest.approx(stats.ttest_rel(other, claimed).pvalue)
    family = [c.p for c in results.comparisons]
    assert [c.p_holm for c in results.comparisons] == pytest.approx(holm(family))
    # the baseline comparison of a cell is still the one the tables read
    assert results.comparison("w1a1", "other").baseline == "base"
    text = report.markdown(spec, results)
    assert "## Controls" in text and "same quantizer, no partner" in text
    assert "| w1a1 | other | claimed | 4 |" in text
    again = StudyResults.from_json(json.loads(json.dumps(results.to_json())))
    assert again.controls == results.controls
    # a control that names the baseline is the baseline test already: not made twice
    mirror = parse_spec({**SPEC, "controls": [{"method": "base", "against": "other"},
                                              {"method": "other", "against": "base"}]})
    assert analyze(mirror, plain).comparisons == plain.comparisons


def test_a_control_must_name_two_methods_of_the_spec():
    from qexp.errors import QexpError

    with pytest.raises(QexpError, match="control"):
        parse_spec({**SPEC, "controls": [{"method": "other", "against": "nope"}]})
    with pytest.raises(QexpError, match="control"):
        parse_spec({**SPEC, "controls": [{"method": "other"}]})


def test_a_claim_without_budget_finds_its_settings_one_condition():
    """A non-numeric claim on a setting run at one budget and optimizer sits beside that
    condition's comparison (the claim names the setting only)."""
    spec = parse_spec({**SPEC, "claims": [{"method": "other", "setting": "w2a2",
                                           "text": "state of the art"}]})
    from dataclasses import replace

    from qexp.study.results import ClaimRow

    plain = _results(budgets=(3.0,), optimizers=("adam",))
    claim = ClaimRow(method="other", setting="w2a2", text="state of the art")
    results = analyze(spec, replace(plain, claims=(claim,)))
    assert results.comparison("w2a2", "other").budget == 3.0
    text = report.markdown(spec, results)
    row = next(line for line in text.splitlines() if "state of the art" in line)
    assert "not numeric" in row and "| better |" in row


def test_bits_figure_budget_is_the_one_most_settings_ran():
    from qexp.study.results import CellRow

    def cell(setting: str, budget: float) -> CellRow:
        return CellRow.from_json({"setting": setting, "title": setting, "bits": 1,
                                  "method": "m", "status": "completed", "n": 2, "mean": 0.5,
                                  "budget": budget})  # fmt: skip

    # W1/A1 over 1, 3 and 9 epochs, a scratch arm at 9, W2 and W4 at 3: all widths at 3
    cells = [cell("w1a1", b) for b in (1, 3, 9)] + [cell("scratch", 9), cell("w2a2", 3),
                                                    cell("w4a4", 3)]  # fmt: skip
    results = StudyResults(name="s", seeds=(0, 1), alpha=0.05, cells=tuple(cells))
    assert figures.bits_budget(results) == 3
    tie = StudyResults(name="s", seeds=(0, 1), alpha=0.05,
                       cells=(cell("a", 2), cell("a", 8)))  # fmt: skip
    assert figures.bits_budget(tie) == 8
    assert figures.bits_budget(StudyResults(name="s", seeds=(0, 1), alpha=0.05)) is None


def test_cells_with_borrowed_knobs_name_their_source_and_are_drawn_once(tmp_path: Path):
    spec = parse_spec({
        "name": "t", "seeds": [0, 1], "tuning": {"trials": 1},
        "settings": [
            {"key": "e2", "group": "w1", "bits": 1, "baseline": "base", "budget": 2},
            {"key": "e1", "group": "w1", "bits": 1, "baseline": "base", "budget": 1,
             "knobs_from": "e2"}],
        "methods": {"base": {}},
    })  # fmt: skip
    trials = [{"number": 0, "state": "complete", "val_acc": 0.5,
               "params": {"trainer.lr": 0.01}}]  # fmt: skip
    cells = [{"setting": "w1", "title": "W1", "bits": 1, "method": "base", "status": "completed",
              "n": 2, "mean": 0.5, "budget": b, "knobs_from": src, "trials": trials}
             for b, src in ((2, None), (1, "e2"))]  # fmt: skip
    results = StudyResults.from_json({"name": "t", "seeds": [0, 1], "alpha": 0.05,
                                      "cells": cells})  # fmt: skip
    text = report.markdown(spec, results)
    assert "| w1, budget 1 | base |" in text and "those of w1, budget 2 |" in text
    drawn: list[str] = []
    import matplotlib.axes

    real = matplotlib.axes.Axes.set_title

    def spy(self, title, *args, **kwargs):
        drawn.append(title)
        return real(self, title, *args, **kwargs)

    matplotlib.axes.Axes.set_title = spy
    try:
        figures.lr_figure(spec, results, tmp_path / "lr.png")
    finally:
        matplotlib.axes.Axes.set_title = real
    assert drawn == ["w1, budget 2"]  # one panel: the tuned condition only


def test_report_counts_trials_pruned_at_their_last_epoch():
    results = _results()
    trials = [{"number": 0, "state": "pruned", "epochs": 3, "planned_epochs": 3},
              {"number": 1, "state": "pruned", "epochs": 1, "planned_epochs": 3},
              {"number": 2, "state": "complete", "epochs": 3, "planned_epochs": 3},
              {"number": 3, "state": "pruned", "epochs": 2}]  # an old record: length unknown
    cells = list(results.cells)
    cells[0] = dataclasses.replace(cells[0], trials=tuple(TrialRow.from_json(t) for t in trials))
    results = dataclasses.replace(results, cells=tuple(cells))
    assert [t.pruned_at_end for t in results.cells[0].trials] == [True, False, False, False]
    text = report.markdown(parse_spec(SPEC), results)
    assert "1 of the 3 pruned trials were pruned at their last epoch" in text
    assert "never at a trial's last epoch" not in text
    spec = parse_spec({**SPEC, "tuning": {"trials": 1, "prune_last_epoch": False}})
    assert "never at a trial's last epoch" in report.markdown(spec, results)


def test_cells_whose_borrowed_knobs_did_not_carry_are_marked():
    """A gap above carry_check.tolerance between the borrowed LR and the best scale marks the
    cell's results row and names the gap under the table; one within it does not."""
    vals = {"claimed": {1.0: 0.80, 3.0: 0.83}, "other": {1.0: 0.80, 3.0: 0.805}}
    carry = [CarryRow(setting="w1a1", method=m, lr_scale=x, seed=seed, tuned_at="w1a1",
                      lr=0.01 * x, best_val_acc=v + 0.001 * seed)
             for m, by_scale in vals.items() for x, v in by_scale.items()
             for seed in (100, 101)]  # fmt: skip
    results = dataclasses.replace(_results(), carry=tuple(carry))
    borrowing = [SPEC["settings"][0], {**SPEC["settings"][1], "knobs_from": "w1a1"}]
    base = {**SPEC, "settings": borrowing}
    spec = parse_spec({**base, "carry_check": {"methods": ["claimed", "other"],
                                               "tolerance": 0.01}})  # fmt: skip
    assert set(report.not_carried(spec, results)) == {(("w1a1", None, None), "claimed")}
    text = report.markdown(spec, results)
    assert "| claimed † |" in text and "| other † |" not in text
    assert "claimed at w1a1 (3.0 points behind LR x3)" in text
    assert "In 2 of the 2 cells the best scale is at the edge" in text  # x3: the largest
    loose = parse_spec({**base, "carry_check": {"methods": ["claimed"], "tolerance": 0.05}})
    assert report.not_carried(loose, results) == {}
    assert "| claimed † |" not in report.markdown(loose, results)


def test_claims_at_one_condition_are_matched_at_that_condition():
    """Two claims differing only in optimizer: the one whose condition ran is tested, the other
    is listed untested under its own condition (not taken as tested by its twin)."""
    claims = [{"method": "claimed", "setting": "w1a1", "text": "+2 points", "diff": 0.02,
               "budget": 2, "optimizer": opt} for opt in ("adam", "sgd")]  # fmt: skip
    spec = parse_spec({**SPEC, "claims": claims})
    results = _results(budgets=(1, 2), optimizers=("adam",), aa=False)
    results = analyze(spec, dataclasses.replace(
        results, claims=tuple(ClaimRow.from_json(c) for c in claims), claim_tests=()))
    assert [(t.budget, t.optimizer) for t in results.claim_tests] == [(2, "adam")]
    assert [report.claim_covers(c, results.claim_tests[0]) for c in results.claims] == [
        True, False]  # fmt: skip
    text = report.markdown(spec, results)
    untested = text[text.index("Claims without a tested number"):]
    assert "| claimed | w1a1, budget 2, sgd |" in untested
    assert "w1a1, budget 2, adam" not in untested


def test_untested_claims_are_listed_per_condition_with_their_measurement():
    """A claim naming a budget but no optimizer, in a study that varies optimizers, speaks of
    both optimizers: each is listed with its own comparison (none of them tested: no number);
    a second claim at the same condition keeps its own text in the confirmatory table."""
    claims = [{"method": "other", "setting": "w1a1", "text": "wins at budget 2",
               "budget": 2},
              {"method": "claimed", "setting": "w1a1", "text": "+2 points", "diff": 0.02},
              {"method": "claimed", "setting": "w1a1", "text": "+5 points, elsewhere",
               "diff": 0.05}]  # fmt: skip
    spec = parse_spec({**SPEC, "claims": claims})
    results = _results(budgets=(1, 2), optimizers=("adam", "sgd"), aa=False)
    results = analyze(spec, dataclasses.replace(
        results, claims=tuple(ClaimRow.from_json(c) for c in claims), claim_tests=()))
    untested = report.untested_claims(results)
    assert [(c.method, comp.budget, comp.optimizer) for c, comp in untested] == [
        ("other", 2, "adam"), ("other", 2, "sgd")]  # fmt: skip
    assert all(comp.diff is not None for _, comp in untested)
    text = report.markdown(spec, results)
    assert "| other | w1a1, budget 2, adam | wins at budget 2" in text
    assert "| other | w1a1, budget 2, sgd | wins at budget 2" in text
    for test in results.claim_tests:  # each test row names the claim it tests
        words = "+2 points (" if test.claimed == 0.02 else "+5 points, elsewhere ("
        row = f"| claimed | {condition_words(test.setting, test.budget, test.optimizer)} | {words}"
        assert row in text


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"tuning": {"trials": 1, "prune_warmup_epochs": -1}}, "prune_warmup_epochs=-1"),
        ({"tuning": {"trials": 1, "prune_startup_trials": 1.5}}, "prune_startup_trials=1.5"),
        ({"carry_check": {"methods": ["claimed"], "tolerance": "1pt"}}, "carry_check.tolerance"),
    ],
)
def test_bad_counts_and_tolerances_are_one_line_errors(change, words):
    with pytest.raises(QexpError) as err:
        parse_spec({**SPEC, **change})
    assert words in str(err.value) and "\n" not in str(err.value)


def test_best_learning_rates_at_the_edge_of_their_range_are_named():
    results = _results()
    space = {"trainer.lr": "[0.0001, 0.01] (log)"}
    at = {"base": 0.009, "claimed": 0.001, "other": 0.00011}  # 0.98, 0.5, 0.02 of the log range
    cells = tuple(dataclasses.replace(c, space=space, best_params={"trainer.lr": at[c.method]})
                  if c.setting == "w1a1" else c for c in results.cells)  # fmt: skip
    edge = report._lr_at_edge(dataclasses.replace(results, cells=cells))
    assert edge == ["base at w1a1 (0.009, upper end)", "other at w1a1 (0.00011, lower end)"]
    text = report.markdown(parse_spec(SPEC), dataclasses.replace(results, cells=cells))
    assert "search range's edge, where a wider range might have found more: base at w1a1" in text
