"""The study's outputs: report.md, cells.csv, runs.csv, results.json, accuracy_vs_bits.png
and TensorBoard summaries (tensorboard/<method>), all rewritten from the results each call."""

from __future__ import annotations

import csv
import io
import math
import shutil
from pathlib import Path
from typing import Any

from qexp.record import atomic_write, write_json
from qexp.study.results import ComparisonRow, StudyResults, from_summary
from qexp.study.space import Knob, describe
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


def claim_position(claimed: float | None, comp: ComparisonRow | None) -> str:
    """Where a paper's claimed gain falls against qexp's 95% interval of the same difference:
    "inside" (consistent with the measurement), "above" / "below" (not reproduced), or "–"
    (no number claimed, or nothing measured)."""
    if claimed is None or comp is None or comp.low is None or comp.high is None:
        return "–"
    if claimed > comp.high:
        return "above"
    if claimed < comp.low:
        return "below"
    return "inside"


def _diff_text(comp: ComparisonRow | None) -> str:
    return _interval(comp.diff, comp.low, comp.high, True) if comp else "–"


def markdown(spec: StudySpec, results: StudyResults) -> str:
    """The report: protocol, choices and reasons, references, tuning, results, claims."""
    t = spec.tuning
    lines = [
        f"# Study `{spec.name}`",
        "",
        "Accuracies are test accuracies of the hard-quantized networks, in percent; intervals "
        "are 95% Student-t intervals over seeds; differences are paired by seed against the "
        "setting's baseline; p-values are from paired t-tests, Holm-corrected over all "
        f"{len(results.comparisons)} comparisons (family-wise alpha {spec.alpha}).",
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
        f"- **Tuning.** {t.trials} Optuna trials per method and setting (TPE, seed "
        f"{t.sampler_seed}; median pruning after {t.prune_startup_trials} trials and "
        f"{t.prune_warmup_epochs} epoch(s)), on seed {t.seed} with "
        f"`{' '.join(t.overrides) or '(no extra overrides)'}`, maximizing best validation "
        "accuracy. The test split is sealed in tuning runs: reading it is an error. Failed and "
        "pruned trials count against the budget.",
        f"- **Final runs.** Each method's best knobs per setting, seeds {list(spec.seeds)}, with "
        f"`{' '.join(spec.final) or '(no extra overrides)'}`.",
        "- **Cost.** Training wall time (mean over seeds) and whole-network forward and "
        "backward passes per step, as each estimator declares them (`passes_per_step`).",
        "",
    ]
    notes = spec.raw.get("notes") or []
    if notes:
        lines += ["## Choices and reasons", ""] + [f"- {n}" for n in notes] + [""]
    lines += [
        "## Full-precision references",
        "",
        f"| setting | seed | epochs run / cap | best epoch | val gain, last {spec.plateau.window} "
        "epochs | converged | val | test |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results.references:
        lines.append(
            f"| {r.setting} | {r.seed} | {r.epochs_done} / {r.max_epochs} | "
            f"{r.best_epoch} | {_gain(r.plateau_gain)} | {'yes' if r.converged else 'no'} | "
            f"{_pct(r.best_val_acc)} | {_pct(r.test_acc)} |"
        )
    lines += [
        "",
        "## Tuned knobs",
        "",
        "| setting | method | search space | best knobs | best val | trials (ok/pruned/failed) |",
        "|---|---|---|---|---|---|",
    ]
    for c in results.cells:
        counts = "/".join(str(k) for k in c.trial_counts)
        space = "; ".join(f"`{k}` {v}" for k, v in c.space.items())
        lines.append(
            f"| {c.setting} | {c.method} | {space} | {_params(c.best_params)} | "
            f"{_pct(c.best_val)} | {counts} |"
        )
    lines += [
        "",
        "## Results",
        "",
        "| setting | method | n | test acc [95% CI] | vs baseline [95% CI] | p | p (Holm) | "
        "verdict | train s | fwd/bwd per step |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    baselines = {s.key: s.baseline for s in spec.settings}
    for c in results.cells:
        comp = results.comparison(c.setting, c.method)
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
        lines.append(
            f"| {c.title} | {c.method} | {c.n} | {_interval(c.mean, c.low, c.high)} | "
            f"{_diff_text(comp)} | {_p(comp.p) if comp else '–'} | "
            f"{_p(comp.p_holm) if comp else '–'} | {verdict} | {secs} | {passes} |"
        )
    if results.claims:
        lines += [
            "",
            "## The papers' claims beside qexp's measurement",
            "",
            "| method | setting | claim | claimed gain | measured vs baseline [95% CI] "
            "| claim vs interval | verdict |",
            "|---|---|---|---|---|---|---|",
        ]
        for claim in results.claims:
            comp = results.comparison(claim.setting, claim.method)
            lines.append(
                f"| {claim.method} | {claim.setting} | {claim.text} ({claim.source}) "
                f"| {_pct(claim.diff, True) if claim.diff is not None else 'not numeric'} "
                f"| {_diff_text(comp)} | {claim_position(claim.diff, comp)} "
                f"| {comp.verdict if comp else '–'} |"
            )
    lines += [
        "",
        "## Reading the verdicts",
        "",
        f"*better* / *worse*: the Holm-corrected p-value is below {spec.alpha} and the mean "
        "paired difference is positive / negative. *no evidence*: the data do not separate the "
        "method from the baseline at that level (which is not evidence that they are equal: "
        "look at the interval's width). A claim's gain inside the measured interval is "
        "consistent with qexp's measurement; a claim above the interval is not reproduced "
        "here (different data set, network and budget: see the protocol).",
        "",
    ]
    return "\n".join(lines)


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
        comp = results.comparison(c.setting, c.method)
        row = {k: v for k, v in c.to_json().items() if k not in ("trials", "space")}
        row["best_params"] = _params(c.best_params)
        if comp is not None:
            row.update(
                baseline=comp.baseline, diff=comp.diff, diff_low=comp.low, diff_high=comp.high,
                p=comp.p, p_holm=comp.p_holm, verdict=comp.verdict,
            )  # fmt: skip
        rows.append(row)
    return rows


CELL_KEYS = [
    "setting", "bits", "method", "status", "n", "mean", "low", "high", "baseline", "diff",
    "diff_low", "diff_high", "p", "p_holm", "verdict", "train_time_s", "forward_per_step",
    "backward_per_step", "best_params", "best_val", "error",
]
RUN_KEYS = [
    "setting", "method", "seed", "status", "test_acc", "best_val_acc", "epochs_done",
    "train_time_s", "forward_per_step", "backward_per_step", "reason", "error", "run_dir",
]


def figure(spec: StudySpec, results: StudyResults, path: Path) -> None:
    """Mean test accuracy against bit width with 95% interval bars, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for i, method in enumerate(m.name for m in spec.methods):
        cells = sorted(
            (c for c in results.cells if c.method == method and c.n > 0), key=lambda c: c.bits
        )
        if not cells:
            continue
        xs = [c.bits * (1 + 0.015 * (i - len(spec.methods) / 2)) for c in cells]
        ys = [100 * c.mean for c in cells]
        err = [
            [100 * (c.mean - c.low) if c.low is not None else 0 for c in cells],
            [100 * (c.high - c.mean) if c.high is not None else 0 for c in cells],
        ]
        ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=method)
    refs = [r.test_acc for r in results.references if r.test_acc is not None]
    if refs:
        ax.axhline(100 * sum(refs) / len(refs), ls="--", c="grey", label="full precision (mean)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("bits (W/A); 1 bit in BinaryNet form")
    ax.set_ylabel("test accuracy (%), mean and 95% CI over seeds")
    ax.set_title(spec.name)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    atomic_write(path, lambda f: f.write(buf.getvalue()))


def tensorboard(spec: StudySpec, results: StudyResults, folder: Path) -> None:
    """Per method: test accuracy, its interval and the paired difference against bit width."""
    from torch.utils.tensorboard import SummaryWriter

    shutil.rmtree(folder, ignore_errors=True)  # rewritten whole, so a rerun adds nothing
    for method in spec.methods:
        writer = SummaryWriter(str(folder / method.name))
        for c in results.cells:
            if c.method != method.name or c.n == 0:
                continue
            writer.add_scalar("study/test_acc", c.mean, c.bits)
            if c.low is not None:
                writer.add_scalar("study/test_acc_ci_low", c.low, c.bits)
                writer.add_scalar("study/test_acc_ci_high", c.high, c.bits)
            comp = results.comparison(c.setting, c.method)
            if comp and comp.diff is not None:
                writer.add_scalar("study/diff_vs_baseline", comp.diff, c.bits)
            if c.train_time_s is not None:
                writer.add_scalar("study/train_time_s", c.train_time_s, c.bits)
        writer.close()


def _gain(value: float | None) -> str:
    return "too few epochs" if value is None else f"{100 * value:+.2f} pts"


def write_all(
    spec: StudySpec, folder: Path, results: StudyResults | dict[str, Any]
) -> dict[str, Path]:
    """Write every output of the study into ``folder``; returns their paths. ``results``:
    typed, or the dict of ``pipeline.summarize`` (read through :func:`from_summary`)."""
    if isinstance(results, dict):
        results = from_summary(results)
    paths = {
        "report": folder / "report.md",
        "cells": folder / "cells.csv",
        "runs": folder / "runs.csv",
        "json": folder / "results.json",
        "figure": folder / "accuracy_vs_bits.png",
        "tensorboard": folder / "tensorboard",
    }
    text = markdown(spec, results).encode()
    atomic_write(paths["report"], lambda f: f.write(text))
    cells = _csv(cell_rows(results), CELL_KEYS)
    atomic_write(paths["cells"], lambda f: f.write(cells))
    runs = _csv([r.to_json() for r in results.runs], RUN_KEYS)
    atomic_write(paths["runs"], lambda f: f.write(runs))
    write_json(results.to_json(), paths["json"])
    figure(spec, results, paths["figure"])
    tensorboard(spec, results, paths["tensorboard"])
    return paths
