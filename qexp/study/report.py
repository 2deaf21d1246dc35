"""The study's outputs: report.md, cells.csv, runs.csv, results.json and TensorBoard
summaries (tensorboard/<method>), with the figures of qexp.study.figures, all rewritten from
the results each call."""

from __future__ import annotations

import csv
import io
import math
import re
import shutil
from pathlib import Path
from typing import Any

from qexp.record import atomic_write, write_json
from qexp.study.figures import budget_figure, figure, lr_figure
from qexp.study.ledger import machine_words
from qexp.study.results import (
    CLAIM_CONSISTENT,
    CLAIM_NOT_OBSERVED,
    CLAIM_SMALLER,
    CellRow,
    ClaimRow,
    ClaimTestRow,
    ComparisonRow,
    StudyResults,
    analyze,
    condition_words,
    from_summary,
)
from qexp.study.space import Knob, describe, search_space
from qexp.study.spec import StudySpec


def range_text(knob: Knob) -> str:
    """A knob's range in words (with the keys that follow it)."""
    also = f" (also {', '.join(knob.also)})" if knob.also else ""
    return describe(knob) + also


def _pct(x: Any, signed: bool = False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{100 * x:+.2f}" if signed else f"{100 * x:.2f}"


def _interval(mean: Any, low: Any, high: Any, signed: bool = False) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "–"
    if low is None or (isinstance(low, float) and math.isnan(low)):
        return _pct(mean, signed)
    return f"{_pct(mean, signed)} [{_pct(low, signed)}, {_pct(high, signed)}]"


def _p(x: Any) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x:.3g}"


def _params(params: dict[str, Any] | None) -> str:
    if not params:
        return "–"
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                     for k, v in params.items())


def claim_position(claimed: float | None, low: float | None, high: float | None) -> str:
    """Where a paper's claimed gain falls against an interval of the measured gain: "inside"
    (consistent with the measurement), "above" / "below" (outside it), or "–" (no number
    claimed, or no interval)."""
    if claimed is None or low is None or high is None:
        return "–"
    if claimed > high:
        return "above"
    if claimed < low:
        return "below"
    return "inside"


def _diff_text(comp: ComparisonRow | None) -> str:
    return _interval(comp.diff, comp.low, comp.high, True) if comp else "–"


def _num(x: float | None, digits: int = 2) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def _budget(x: float | None) -> str:
    return "–" if x is None else f"{x:g}"


def claim_sentence(test: ClaimTestRow) -> str:
    """The verdict of a tested claim in words that fit the evidence."""
    where = condition_words(test.setting, test.budget, test.optimizer)
    claimed = _pct(test.claimed, True)
    if test.verdict == CLAIM_NOT_OBSERVED:
        return f"not observed under {where}: the gain is below the claimed {claimed} points"
    if test.verdict == CLAIM_SMALLER:
        return f"a smaller gain under {where}: above 0, below the claimed {claimed} points"
    if test.verdict == CLAIM_CONSISTENT:
        return f"consistent under {where}: a gain above 0, not below the claimed {claimed}"
    return f"inconclusive under {where}: neither below the claim nor above 0"


def common_knobs() -> set[str]:
    """The knobs every method tunes (conf/search_space/common.yaml)."""
    return {k.key for k in search_space("", "")}


def table_order(spec: StudySpec, cells: tuple[CellRow, ...]) -> list[CellRow]:
    """Cells grouped by row (in the spec's order), then optimizer and budget in the spec's
    order of first appearance within the row; methods keep their order."""
    rows = list(dict.fromkeys(s.row for s in spec.settings))
    conditions = list(dict.fromkeys((s.row, s.optimizer, s.budget) for s in spec.settings))

    def key(c: CellRow) -> tuple[int, int]:
        cond = (c.setting, c.optimizer, c.budget)
        where = conditions.index(cond) if cond in conditions else len(conditions)
        row = rows.index(c.setting) if c.setting in rows else len(rows)
        return row, where

    return sorted(cells, key=key)


def equal_time_reading(results: StudyResults, cell: CellRow, baseline: str) -> str:
    """The cell's accuracy at its baseline's training time, where their times differ by
    more than 10%: interpolated along the method's training budgets when the baseline's time
    lies between two of them; else the baseline's accuracy at the method's time, along the
    baseline's budgets; else the time ratio alone (neither was run at the other's time)."""
    base = next((c for c in results.cells if c.condition == cell.condition
                 and c.method == baseline), None)  # fmt: skip
    if cell.method == baseline or base is None:
        return "–"
    if cell.train_time_s is None or not base.train_time_s:
        return "–"
    ratio = cell.train_time_s / base.train_time_s
    if abs(math.log(ratio)) < math.log(1.1):
        return "same cost"
    points = sorted(
        (c.train_time_s, c.mean) for c in results.cells
        if (c.setting, c.optimizer, c.method) == (cell.setting, cell.optimizer, cell.method)
        and c.train_time_s is not None and c.mean is not None
    )  # fmt: skip
    at_base_time = _interpolate(points, base.train_time_s)
    if at_base_time is not None:
        return f"{_pct(at_base_time)} (interpolated)"
    # the other way round: the baseline given the method's time, along the baseline's budgets
    base_points = sorted(
        (c.train_time_s, c.mean) for c in results.cells
        if (c.setting, c.optimizer, c.method) == (cell.setting, cell.optimizer, baseline)
        and c.train_time_s is not None and c.mean is not None
    )  # fmt: skip
    base_at_time = _interpolate(base_points, cell.train_time_s)
    if base_at_time is not None:
        return f"×{ratio:.1f} time; baseline at this time {_pct(base_at_time)} (interpolated)"
    return f"×{ratio:.1f} time: not run at the baseline's"


def _interpolate(points: list[tuple[float, float]], x: float) -> float | None:
    """Linear interpolation of sorted (x, y) points at ``x``; None outside their range."""
    for (x0, y0), (x1, y1) in zip(points, points[1:], strict=False):
        if x0 <= x <= x1 and x1 > x0:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return None


def markdown(spec: StudySpec, results: StudyResults, banner: str | None = None) -> str:
    """The report: protocol, choices and reasons, references, tuning, results, A/A, claims;
    ``banner``: a paragraph under the title (a preview's warning)."""
    t = spec.tuning
    lines = [
        f"# Study `{spec.name}`",
        "",
        *([f"> {banner}", ""] if banner else []),
        "Accuracies are test accuracies of the hard-quantized networks, in percent; intervals "
        "are 95% Student-t intervals over seeds; differences are paired by seed against the "
        "setting's baseline. Two families of tests: the papers' numeric claims are "
        "**confirmatory** (two one-sided paired t-tests each, Holm within that family of "
        f"{len(results.claim_tests) * 2} tests: see the claims section); every method-versus-"
        "baseline comparison is **exploratory**: two-sided paired t-tests, Holm-corrected over "
        f"all {len(results.comparisons)} comparisons (family-wise alpha {spec.alpha}), "
        "reported with effect sizes (Cohen's d_z) and the minimum detectable effect.",
        "",
        "## Protocol",
        "",
        f"- Every run: `{' '.join(spec.base)}`.",
        "- **References.** One full-precision network per (network form, data set, seed), "
        f"trained with `{' '.join(spec.reference)}` and cached with "
        "qexp's full-precision cache (the one block replacement's partner uses); every "
        "quantized run of a seed starts from it (`init_from`), and block replacement uses it "
        "as its frozen partner. A reference counts as converged when the best validation "
        f"accuracy of its last {spec.plateau.window} epochs beats the best before them by "
        f"less than {100 * spec.plateau.tolerance:.1f} points (the plateau column).",
        "- **Paired design.** For a seed, every method starts from the same reference weights, "
        "sees the same batch order (the data order is a function of the run seed) and the same "
        "validation split (`dataset.split_seed` is fixed).",
        f"- **Tuning.** {t.trials} Optuna trials per method and tuned setting (TPE, sampler "
        f"seed {t.sampler_seed}, "
        + (f"{t.startup_trials} random start trials" if t.startup_trials is not None
           else "Optuna's 10 random start trials")
        + f"; median pruning after {t.prune_startup_trials} finished trials and "
        f"{t.prune_warmup_epochs} epoch(s)"
        + (", never before the method trains its deployed form (at the trial's own knobs)"
           if t.prune_before_deployed else "")
        + ("" if t.prune_last_epoch else ", never at a trial's last epoch")
        + f"), each trial on seed(s) {', '.join(map(str, t.all_seeds))}"
        + (" (its objective their mean best validation accuracy)" if len(t.all_seeds) > 1
           else " (its objective the best validation accuracy)")
        + f", with `{' '.join(t.overrides) or '(no extra overrides)'}` and each setting's own "
        "tuning overrides. The test split is sealed in tuning runs: reading it is an error. "
        "Failed and pruned trials count against the budget.",
        f"- **Final runs.** Each method's best knobs per setting, seeds {list(spec.seeds)}, with "
        f"`{' '.join(spec.final) or '(no extra overrides)'}` and each setting's own final "
        "overrides (its training budget, optimizer).",
        "- **Cost.** Training wall time (mean over seeds) and whole-network forward and "
        "backward passes per step, as each estimator declares them (`passes_per_step`).",
        "",
    ]
    if results.spec_changes:
        lines += [
            "- **Spec changes after the study began** (only keys that change no run, or "
            "appended settings, are accepted): "
            + "; ".join(f"{c.when[:16].replace('T', ' ')} UTC, {', '.join(c.keys)} "
                        f"({c.tuning_runs_completed} tuning and {c.final_runs_completed} final "
                        f"runs done by then{'; ' + c.note if c.note else ''})"
                        for c in results.spec_changes)
            + ".",
            "",
        ]  # fmt: skip
    notes = spec.raw.get("notes") or []
    if notes:
        lines += ["## Choices and reasons", ""] + [f"- {n}" for n in notes] + [""]
    lines += _references_section(spec, results)
    lines += _tuning_section(spec, results)
    lines += _carry_section(spec, results)
    lines += _results_section(spec, results)
    lines += _controls_section(spec, results)
    lines += _aa_section(spec, results)
    lines += _claims_section(spec, results)
    lines += _compute_section(results)
    lines += [
        "",
        "## Reading the verdicts",
        "",
        f"*better* / *worse*: the Holm-corrected p-value is below {spec.alpha} and the mean "
        "paired difference is positive / negative. *no evidence*: the data do not separate the "
        "method from the baseline at that level (which is not evidence that they are equal: "
        "compare the interval's width and the MDE column, the smallest true difference the "
        "test finds 80% of the time). A claim is *not observed* under a setting, budget and "
        "optimizer when the gain measured there is significantly below the claimed one; that "
        "speaks of this data set, network and budget (see the protocol), not of the paper's "
        "own experiment.",
        "",
    ]
    return "\n".join(lines)


def _references_section(spec: StudySpec, results: StudyResults) -> list[str]:
    # one line per network, naming every row that starts from it
    networks = results.networks
    scratch = {s.row for s in spec.settings} - {s.row for s in spec.settings
                                                 if s.init == "reference"}  # fmt: skip
    lines = [
        "## Full-precision references",
        "",
        f"| rows | seed | epochs run / cap | best epoch | val gain, last {spec.plateau.window} "
        "epochs | converged | val | test |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for same in networks.values():
        r = same[0]
        labels = dict.fromkeys(x.setting for x in same)
        rows = ", ".join(f"{x} (float line only)" if x in scratch else x for x in labels)
        lines.append(
            f"| {rows} | {r.seed} | {r.epochs_done} / {r.max_epochs} | "
            f"{r.best_epoch} | {_gain(r.plateau_gain)} | {'yes' if r.converged else 'no'} | "
            f"{_pct(r.best_val_acc)} | {_pct(r.test_acc)} |"
        )
    if scratch:
        lines += ["", f"{', '.join(sorted(scratch))}: trained from scratch; its runs do not "
                  "start from these networks, which give its figure its full-precision line."]
    unconverged = [same[0] for same in networks.values() if not same[0].converged]
    if unconverged:
        lines += ["", f"{len(unconverged)} of the {len(networks)} networks were still gaining at "
                  "their epoch cap by the plateau rule above. Every method of a seed starts "
                  "from the same network, so the paired comparisons are not tilted by it; the "
                  "full-precision line and the quantized accuracies are those of this "
                  "reference length."]  # fmt: skip
    moved = [r for r in results.references if r.recorded_test_acc is not None]
    if moved:
        lines += [
            "",
            "Retrained on another machine or into a fresh cache (checkpoints do not travel "
            "with a study), these references differ from the copies the earlier runs started "
            "from (test accuracy first recorded -> now): "
            + "; ".join(f"{r.setting} seed {r.seed}: {_pct(r.recorded_test_acc)} -> "
                        f"{_pct(r.test_acc)}" for r in moved)
            + ". Runs started from either copy are mixed in this study.",
        ]  # fmt: skip
    return lines


def _tuning_section(spec: StudySpec, results: StudyResults) -> list[str]:
    common = common_knobs()
    lines = [
        "",
        "## Tuned knobs",
        "",
        "| setting | method | search space | best knobs | best val | trials (ok/pruned/failed) "
        "| tuning seeds |",
        "|---|---|---|---|---|---|---|",
    ]
    only_common = []
    keys = {s.key: s for s in spec.settings}
    for c in results.cells:
        counts = "/".join(str(k) for k in c.trial_counts)
        source = keys.get(c.knobs_from or "")
        if source is not None:  # the trials are those of the setting it takes its knobs from
            counts = f"those of {condition_words(source.row, source.budget, source.optimizer)}"
        space = "; ".join(f"`{k}` {v}" for k, v in c.space.items())
        if c.space and set(c.space) <= common:
            space += " (common knobs only)"
            only_common.append(c.method)
        seeds = ", ".join(str(s) for s in (c.tuning_seeds or (spec.tuning.seed,)))
        adopted = (f" (LR x{c.lr_scale:.3g} of the tuned one: the carry check's best)"
                   if c.lr_scale else "")  # fmt: skip
        lines.append(
            f"| {condition_words(c.setting, c.budget, c.optimizer)} | {c.method} | {space} | "
            f"{_params(c.best_params)}{adopted} | {_pct(c.best_val)} | {counts} | {seeds} |"
        )
    at_end = [t for c in results.cells if not c.knobs_from for t in c.trials if t.pruned_at_end]
    if at_end:
        pruned = sum(t.state == "pruned" for c in results.cells if not c.knobs_from
                     for t in c.trials)  # fmt: skip
        lines += ["", f"{len(at_end)} of the {pruned} pruned trials were pruned at their last "
                  "epoch, where pruning saves no compute and turns a finished trial into a "
                  "pruned one (`tuning.prune_last_epoch: false` stops that)."]  # fmt: skip
    edge = _lr_at_edge(results)
    if edge:
        lines += ["", "Best learning rate within a tenth (on the log scale) of its search "
                  "range's edge, where a wider range might have found more: "
                  + "; ".join(edge) + "."]  # fmt: skip
    if only_common:
        names = ", ".join(sorted(set(only_common)))
        lines += ["", f"{names}: tuned on the common knobs only (no search space of its "
                  "own), with the same trials as every other method."]  # fmt: skip
    return lines


def _lr_at_edge(results: StudyResults, margin: float = 0.1) -> list[str]:
    """The tuned cells whose best LR lies within ``margin`` of its log range's ends."""
    out = []
    for c in results.cells:
        lr = (c.best_params or {}).get("trainer.lr")
        bounds = re.match(r"\[([^,\]]+), ([^\]]+)\] \(log\)", c.space.get("trainer.lr", ""))
        if c.knobs_from or lr is None or bounds is None:
            continue
        low, high = (math.log(float(x)) for x in bounds.groups())
        where = (math.log(lr) - low) / (high - low)
        if where < margin or where > 1 - margin:
            side = "lower" if where < margin else "upper"
            out.append(f"{c.method} at {condition_words(c.setting, c.budget, c.optimizer)} "
                       f"({lr:.3g}, {side} end)")  # fmt: skip
    return out


def carry_table(results: StudyResults) -> list[dict[str, Any]]:
    """The carry check per (condition, method): mean validation accuracy at each LR scale
    (over the tuning seeds), the best scale, and the borrowed LR's gap to the best."""
    groups: dict[tuple, dict[float, list[float]]] = {}
    meta: dict[tuple, Any] = {}
    for r in results.carry:
        key = (*r.condition, r.method)
        meta.setdefault(key, r)
        if r.best_val_acc is not None:
            groups.setdefault(key, {}).setdefault(r.lr_scale, []).append(r.best_val_acc)
    out = []
    for key, first in meta.items():
        means = {x: sum(v) / len(v) for x, v in sorted(groups.get(key, {}).items())}
        best = max(means, key=lambda x: means[x]) if means else None
        one = next((x for x in means if math.isclose(x, 1.0)), None)
        gap = means[best] - means[one] if best is not None and one is not None else None
        lr = first.lr / first.lr_scale if first.lr is not None and first.lr_scale else None
        out.append({"condition": key[:3], "method": key[3], "tuned_at": first.tuned_at,
                    "lr": lr, "means": means, "best": best, "gap": gap,
                    "seeds": max((len(v) for v in groups.get(key, {}).values()), default=0)})
    return out


def not_carried(spec: StudySpec, results: StudyResults) -> dict[tuple, dict[str, Any]]:
    """(condition, method) -> its carry-check row, for the cells whose borrowed LR fell more
    than ``carry_check.tolerance`` behind the best scale."""
    check = spec.carry_check
    if check is None or check.adopt:  # adopted: the cells ran at the check's best scale
        return {}
    return {(row["condition"], row["method"]): row for row in carry_table(results)
            if row["gap"] is not None and row["gap"] > check.tolerance}  # fmt: skip


def _carry_section(spec: StudySpec, results: StudyResults) -> list[str]:
    check = spec.carry_check
    if check is None or not results.carry:
        return []
    scales = list(check.lr_scales)
    heads = " | ".join(f"val at LR x{x:.3g}" for x in scales)
    lines = [
        "",
        "## Do the tuned knobs carry to other budgets?",
        "",
        "Settings that borrow their knobs from another budget (`knobs_from`) were checked: "
        "the borrowed knobs with the learning rate times each scale, trained at the borrowing "
        "budget on the tuning seeds (validation accuracy, mean over seeds; test sealed). The "
        "borrowed LR carries when no other scale beats it; a gap of a few tenths of a point "
        "on two seeds is within seed noise (compare the A/A row). "
        + ("With `carry_check.adopt` each checked cell's final runs train at its best scale "
           "(the borrowed LR on a tie): a three-point LR re-tune at the borrowing budget, on "
           "the tuning seeds, the same for every checked method." if check.adopt else
           f"A gap above {100 * check.tolerance:g} point(s) (`carry_check.tolerance`) marks "
           "the cell's final runs † in the results: they ran on knobs that did not carry."),
        "",
        f"| condition | method | knobs tuned at | borrowed LR | {heads} | best | gap of x1 |",
        "|---|---|---|---|" + "---|" * len(scales) + "---|---|",
    ]
    keys = {s.key: s for s in spec.settings}
    for row in carry_table(results):
        src = keys.get(row["tuned_at"])
        tuned = condition_words(src.row, src.budget, src.optimizer) if src else row["tuned_at"]
        vals = " | ".join(_pct(row["means"].get(x)) for x in scales)
        best = f"x{row['best']:.3g}" if row["best"] is not None else "–"
        lr = f"{row['lr']:.3g}" if row["lr"] is not None else "–"
        lines.append(
            f"| {condition_words(*row['condition'])} | {row['method']} | {tuned} | {lr} | "
            f"{vals} | {best} | {_pct(row['gap'])} |"
        )
    table = carry_table(results)
    edge = [r for r in table if r["best"] is not None and r["gap"]
            and r["best"] in (min(scales), max(scales))]  # fmt: skip
    if edge:
        lines += ["", f"In {len(edge)} of the {len(table)} cells the best scale is at the edge "
                  "of the checked ones: a better LR may lie beyond it, so those cells may fall "
                  "a little short of what a finer search would give them."]  # fmt: skip
    return lines


def _results_section(spec: StudySpec, results: StudyResults) -> list[str]:
    varied = bool(results.budgets or results.optimizers)
    extra = "budget | optimizer | " if varied else ""
    lines = [
        "",
        "## Results (exploratory)",
        "",
        f"| setting | {extra}method | n | test acc [95% CI] | vs baseline [95% CI] | d_z "
        f"| MDE (80%) | p | p (Holm) | verdict | train s | at baseline's time "
        "| fwd/bwd per step |",
        "|---|" + "---|" * (12 + 2 * varied),
    ]
    baselines = {s.row: s.baseline for s in spec.settings}
    uncarried = not_carried(spec, results)
    for c in table_order(spec, results.cells):
        comp = results.comparison(c.setting, c.method, c.budget, c.optimizer)
        mark = " †" if (c.condition, c.method) in uncarried else ""
        if c.status == "failed":
            verdict = f"failed: {c.error}"
        elif baselines[c.setting] == c.method:
            verdict = "baseline"
        else:
            verdict = comp.verdict if comp else "–"
        passes = (
            f"{c.forward_per_step}/{c.backward_per_step}" if c.forward_per_step is not None
            else "–"
        )  # fmt: skip
        secs = f"{c.train_time_s:.1f}" if c.train_time_s is not None else "–"
        cond = f"{_budget(c.budget)} | {c.optimizer or '–'} | " if varied else ""
        lines.append(
            f"| {c.title} | {cond}{c.method}{mark} | {c.n} | "
            f"{_interval(c.mean, c.low, c.high)} | "
            f"{_diff_text(comp)} | {_num(comp.d_z) if comp else '–'} | "
            f"{_pct(comp.mde) if comp else '–'} | {_p(comp.p) if comp else '–'} | "
            f"{_p(comp.p_holm) if comp else '–'} | {verdict} | {secs} | "
            f"{equal_time_reading(results, c, baselines[c.setting])} | {passes} |"
        )
    lines += [
        "",
        "d_z: mean paired difference over the SD of the paired differences. MDE: the smallest "
        "true difference the two-sided paired t-test at the study's alpha "
        f"({spec.alpha}, per test, before Holm) detects with 80% power, from the observed SD "
        "and n (noncentral t; cells.csv also holds its normal approximation). At baseline's "
        "time: where the method's training time differs from its baseline's by more than 10%, "
        "its accuracy at the baseline's time when its training budgets bracket that time; "
        "else the baseline's accuracy at the method's time when the baseline's budgets "
        "bracket it; else the time ratio alone.",
    ]
    if uncarried:
        words = "; ".join(
            f"{m} at {condition_words(*cond)} ({100 * row['gap']:.1f} points behind LR "
            f"x{row['best']:.3g})" for (cond, m), row in uncarried.items()
        )
        lines += [
            "",
            f"† Knobs that did not carry (the carry check): {words}. These cells ran on "
            "borrowed knobs the check found off by more than the tolerance, so their "
            "comparisons (a baseline's: every comparison of its condition) read a handicapped "
            "method, not the method at its best.",
        ]
    machines = {machine_words(p.machine) for p in results.pieces if p.machine}
    if len(machines) > 1:
        lines += [
            "",
            f"The runs were timed on {len(machines)} kinds of machine (see how long it took): "
            "the time columns and the equal-time readings mix their clocks.",
        ]
    return lines


def _controls_section(spec: StudySpec, results: StudyResults) -> list[str]:
    """The spec's planned controls: a method against another than its baseline."""
    if not spec.controls:
        return []
    lines = ["", "## Controls", ""]
    lines += [f"- **{c.method} against {c.against}.** {c.text}" for c in spec.controls]
    lines += [
        "",
        "Paired by seed like the baseline comparisons and Holm-corrected in the same "
        "exploratory family.",
        "",
        "| condition | method | against | n | difference [95% CI] | d_z | MDE (80%) | p "
        "| p (Holm) | verdict |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in results.controls:
        lines.append(
            f"| {condition_words(c.setting, c.budget, c.optimizer)} | {c.method} | "
            f"{c.baseline} | {c.n} | {_diff_text(c)} | {_num(c.d_z)} | {_pct(c.mde)} | "
            f"{_p(c.p)} | {_p(c.p_holm)} | {c.verdict} |"
        )
    if not results.controls:
        lines.append("| (no condition ran both methods on two or more seeds) |||||||||")
    return lines


def _aa_section(spec: StudySpec, results: StudyResults) -> list[str]:
    lines = ["", "## A/A: the baseline against itself", ""]
    if not results.aa:
        return lines + [
            "Not measured: this study ran its baselines on one seed set only (give the spec a "
            "second, disjoint seed set for the baseline to measure the noise floor)."
        ]
    varied = bool(results.budgets or results.optimizers)
    lines += [
        "The baseline on a second, disjoint set of seeds minus the same baseline on the "
        "study's seeds, paired by index (the i-th seed of one set with the i-th of the other): "
        "a difference two identical methods show by chance. Not part of either family. "
        + ("Each A/A run fine-tunes the same full-precision reference as the run it is "
           "paired with (as the two methods of a comparison do), so the row is the noise floor "
           "of the paired comparisons." if spec.aa_reference == "paired" else
           "Each A/A run starts from a reference of its own: the noise of two independent "
           "runs, wider than that of the paired comparisons."),
        "",
        "| setting | method | seeds vs other seeds | n | difference [95% CI] | SD of pairs | p |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results.aa:
        where = condition_words(r.setting, r.budget, r.optimizer) if varied else r.setting
        seeds = f"{list(r.seeds)} vs {list(r.other_seeds)}"
        lines.append(
            f"| {where} | {r.method} | {seeds} | {r.n} | "
            f"{_interval(r.diff, r.low, r.high, True)} | {_pct(r.sd)} | {_p(r.p)} |"
        )
    return lines


def _hours(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds / 3600:.2f} h"


def _compute_section(results: StudyResults) -> list[str]:
    """How long the study took and on what: its pieces (calls of `qexp study`) and the
    training time summed over its runs, per stage."""
    lines = ["", "## How long it took, and on what", ""]
    if results.pieces:
        lines += [
            "Each call of `qexp study` is a piece; its wall time runs from its start to its "
            "last heartbeat (a piece stopped from outside ends within a minute of it).",
            "",
            "| piece | started (UTC) | wall | machine | workers x threads | shard | ended |",
            "|---|---|---|---|---|---|---|",
        ]
        for i, p in enumerate(results.pieces, 1):
            ex = p.execution
            ended = "finished" if p.finished else "stopped"
            if p.note:
                ended += f" ({p.note})"
            lines.append(
                f"| {i} | {p.started[:16].replace('T', ' ')} | {_hours(p.wall_s)} | "
                f"{machine_words(p.machine)} | {ex.get('workers')} x {ex.get('threads')} | "
                f"{ex.get('shard') or '-'} | {ended} |"
            )
        total = sum(p.wall_s or 0.0 for p in results.pieces)
        lines += ["", f"Wall time over all pieces: **{_hours(total)}**.", ""]
    # settings of one network form share their references: each trained network once
    unique = {r.run_dir: r.train_time_s for r in results.references}
    refs = [t for t in unique.values() if t is not None]
    finals = [r.train_time_s for r in results.runs if r.train_time_s is not None]
    carry = [r.train_time_s for r in results.carry if r.train_time_s is not None]
    stages = [
        ("full-precision references", len(refs), sum(refs)),
        ("tuning trials (one run per tuning seed)", results.tuning_runs,
         results.tuning_train_s),
        *([("knob carry check", len(carry), sum(carry))] if carry else []),
        ("final runs", len(finals), sum(finals)),
    ]  # fmt: skip
    lines += [
        "Training time summed over runs (each run's own training clock, at its threads; "
        "evaluation, start-up and waiting excluded):",
        "",
        "| stage | runs | training time |",
        "|---|---|---|",
    ]
    lines += [f"| {name} | {n} | {_hours(sec) if sec is not None else 'not recorded'} |"
              for name, n, sec in stages]  # fmt: skip
    all_s = sum(sec or 0.0 for _, _, sec in stages)
    lines.append(f"| all | {sum(n for _, n, _ in stages)} | {_hours(all_s)} |")
    return lines


def claim_covers(claim: ClaimRow, test: ClaimTestRow) -> bool:
    """Whether ``test`` tests ``claim``: same method and setting, and the claim's budget and
    optimizer where it names them (a claim naming neither is tested at every condition)."""
    return (
        (claim.method, claim.setting) == (test.method, test.setting)
        and claim.diff == test.claimed
        and _at_condition(claim, test.budget, test.optimizer)
    )


def _at_condition(claim: ClaimRow, budget: float | None, optimizer: str | None) -> bool:
    """Whether ``claim`` speaks of that budget and optimizer (it names them, or not)."""
    return claim.budget in (None, budget) and claim.optimizer in (None, optimizer)


def untested_claims(results: StudyResults) -> list[tuple[ClaimRow, ComparisonRow | None]]:
    """Each claim at each condition it speaks of that no claim test covers (not numeric, or
    too few paired seeds there), with that condition's comparison; a claim whose conditions
    have no comparison at all once, without one."""
    out: list[tuple[ClaimRow, ComparisonRow | None]] = []
    for claim in results.claims:
        comps = [c for c in results.comparisons
                 if c.kind == "baseline" and (c.setting, c.method) == (claim.setting, claim.method)
                 and _at_condition(claim, c.budget, c.optimizer)]  # fmt: skip
        tested = [t for t in results.claim_tests if claim_covers(claim, t)]
        left = [c for c in comps if claim.diff is None or not any(
            (t.budget, t.optimizer) == (c.budget, c.optimizer) for t in tested)]  # fmt: skip
        out += [(claim, c) for c in left]
        if not comps and not tested:
            out.append((claim, None))
    return out


def _claims_section(spec: StudySpec, results: StudyResults) -> list[str]:
    if not results.claims:
        return []
    lines = [
        "",
        "## The papers' claims beside qexp's measurement",
        "",
    ]
    if results.claim_tests:
        level = results.claim_tests[0].level
        lines += [
            "Confirmatory family: each numeric claim, at each condition it names, gets two "
            "one-sided paired t-tests: *below the claim* (H0: the true gain is at least the "
            "claimed one) and *gain above 0* (H0: the true gain is at most 0); Holm over the "
            f"{2 * len(results.claim_tests)} tests of this family only, family-wise alpha "
            f"{spec.alpha}. The interval is the Bonferroni-adjusted two-sided "
            f"{100 * level:.1f}% interval (each end the one-sided bound at alpha / "
            f"{2 * len(results.claim_tests)}); Holm rejects wherever these bounds exclude the "
            "value, and can reject where they just fail to.",
            "",
            "| method | condition | claim | claimed gain | measured gain [adjusted CI] "
            "| claim vs interval | p below claim (Holm) | p gain > 0 (Holm) | verdict |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for test in results.claim_tests:
            claim = next((c for c in results.claims if claim_covers(c, test)), None)
            text = f"{claim.text} ({claim.source})" if claim else "–"
            lines.append(
                f"| {test.method} | {condition_words(test.setting, test.budget, test.optimizer)} "
                f"| {text} | {_pct(test.claimed, True)} "
                f"| {_interval(test.diff, test.low, test.high, True)} "
                f"| {claim_position(test.claimed, test.low, test.high)} "
                f"| {_p(test.p_below_holm)} | {_p(test.p_gain_holm)} | {claim_sentence(test)} |"
            )
    untested = untested_claims(results)
    if untested:
        lines += [
            "",
            "Claims without a tested number (no numeric gain claimed, or too few paired "
            "seeds): beside the exploratory comparison only, outside the confirmatory family.",
            "",
            "| method | condition | claim | claimed gain | measured vs baseline [95% CI] "
            "| exploratory verdict |",
            "|---|---|---|---|---|---|",
        ]
        for claim, comp in untested:
            own = (claim.setting, claim.budget, claim.optimizer)
            where = condition_words(*(comp.condition if comp is not None else own))
            lines.append(
                f"| {claim.method} | {where} | {claim.text} ({claim.source}) "
                f"| {_pct(claim.diff, True) if claim.diff is not None else 'not numeric'} "
                f"| {_diff_text(comp)} | {comp.verdict if comp else '–'} |"
            )
    return lines


def _csv(rows: list[dict[str, Any]], keys: list[str]) -> bytes:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=keys, extrasaction="ignore")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: r.get(k) for k in keys})
    return buf.getvalue().encode()


def cell_rows(results: StudyResults) -> list[dict[str, Any]]:
    """One row per (setting, method): the cell's interval and its comparison."""
    rows = []
    for c in results.cells:
        comp = results.comparison(c.setting, c.method, c.budget, c.optimizer)
        row = {k: v for k, v in c.to_json().items() if k not in ("trials", "space")}
        row["best_params"] = _params(c.best_params)
        if comp is not None:
            row.update(
                baseline=comp.baseline, diff=comp.diff, diff_low=comp.low, diff_high=comp.high,
                p=comp.p, p_holm=comp.p_holm, verdict=comp.verdict, sd_diff=comp.sd,
                d_z=comp.d_z, mde=comp.mde, mde_normal=comp.mde_normal,
            )  # fmt: skip
        rows.append(row)
    return rows


CELL_KEYS = [
    "setting", "bits", "budget", "optimizer", "method", "status", "n", "mean", "low", "high",
    "baseline", "diff", "diff_low", "diff_high", "p", "p_holm", "verdict", "sd_diff", "d_z",
    "mde", "mde_normal", "train_time_s", "forward_per_step", "backward_per_step",
    "best_params", "lr_scale", "best_val", "error",
]
RUN_KEYS = [
    "setting", "budget", "optimizer", "method", "seed", "status", "test_acc", "best_val_acc",
    "epochs_done", "train_time_s", "forward_per_step", "backward_per_step", "reason", "error",
    "run_dir",
]


def tensorboard(spec: StudySpec, results: StudyResults, folder: Path) -> None:
    """Per method: test accuracy, its interval and the paired difference against bit width
    (tags get a /budget_optimizer suffix when the study varies either)."""
    from torch.utils.tensorboard import SummaryWriter

    shutil.rmtree(folder, ignore_errors=True)  # rewritten whole, so a rerun adds nothing
    varied = bool(results.budgets or results.optimizers)
    for method in spec.methods:
        writer = SummaryWriter(str(folder / method.name))
        for c in results.cells:
            if c.method != method.name or c.n == 0:
                continue
            tail = f"/{_budget(c.budget)}_{c.optimizer or '-'}" if varied else ""
            writer.add_scalar(f"study/test_acc{tail}", c.mean, c.bits)
            if c.low is not None:
                writer.add_scalar(f"study/test_acc_ci_low{tail}", c.low, c.bits)
                writer.add_scalar(f"study/test_acc_ci_high{tail}", c.high, c.bits)
            comp = results.comparison(c.setting, c.method, c.budget, c.optimizer)
            if comp and comp.diff is not None:
                writer.add_scalar(f"study/diff_vs_baseline{tail}", comp.diff, c.bits)
            if c.train_time_s is not None:
                writer.add_scalar(f"study/train_time_s{tail}", c.train_time_s, c.bits)
        writer.close()


def _gain(value: float | None) -> str:
    return "too few epochs" if value is None else f"{100 * value:+.2f} pts"


def write_all(
    spec: StudySpec, folder: Path, results: StudyResults | dict[str, Any],
    banner: str | None = None,
) -> dict[str, Path]:
    """Write every output of the study into ``folder``; returns their paths. ``results``:
    typed, or the dict of ``pipeline.summarize`` (read through :func:`from_summary`);
    ``banner``: a paragraph the report opens with (a preview's warning)."""
    # (re)computed here, so results.json always holds the statistics its report shows
    results = (
        from_summary(spec, results) if isinstance(results, dict) else analyze(spec, results)
    )
    paths = {
        "report": folder / "report.md",
        "cells": folder / "cells.csv",
        "runs": folder / "runs.csv",
        "json": folder / "results.json",
        "figure": folder / "accuracy_vs_bits.png",
        "tensorboard": folder / "tensorboard",
    }
    text = markdown(spec, results, banner).encode()
    atomic_write(paths["report"], lambda f: f.write(text))
    cells = _csv(cell_rows(results), CELL_KEYS)
    atomic_write(paths["cells"], lambda f: f.write(cells))
    runs = _csv([r.to_json() for r in results.runs], RUN_KEYS)
    atomic_write(paths["runs"], lambda f: f.write(runs))
    write_json(results.to_json(), paths["json"])
    figure(spec, results, paths["figure"])
    if results.budgets:
        paths["budget_figure"] = folder / "accuracy_vs_budget.png"
        budget_figure(spec, results, paths["budget_figure"])
    if any("trainer.lr" in t.params for c in results.cells for t in c.trials):
        paths["lr_figure"] = folder / "lr_sensitivity.png"
        lr_figure(spec, results, paths["lr_figure"])
    tensorboard(spec, results, paths["tensorboard"])
    return paths
