"""The study's figures: accuracy against bit width, accuracy against training budget (one
panel per optimizer) and each method's learning-rate sensitivity from its tuning trials; the
full-precision references drawn as one line per network form, never pooled across forms."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

from qexp.record import atomic_write
from qexp.study.results import CellRow, StudyResults, condition_words
from qexp.study.spec import StudySpec


def reference_forms(results: StudyResults) -> list[tuple[str, list[str], list[float]]]:
    """The full-precision references per network form (equal model configs): its label, its
    settings and its test accuracies. Two different float networks are never pooled."""
    forms: dict[str, tuple[list[str], list[float]]] = {}
    for same in results.networks.values():  # a network shared by several rows counts once
        r = same[0]
        settings, accs = forms.setdefault(json.dumps(r.model, sort_keys=True), ([], []))
        settings += [x for x in dict.fromkeys(y.setting for y in same) if x not in settings]
        if r.test_acc is not None:
            accs.append(r.test_acc)
    out = []
    for key, (settings, accs) in forms.items():
        model = json.loads(key)
        form = model.get("activation") or model.get("name") or "network"
        out.append((f"full precision, {form} ({', '.join(settings)})", settings, accs))
    return out


def _draw_references(ax: Any, results: StudyResults, span: dict[str, tuple[float, float]] | None,
                     only: set[str] | None = None) -> None:  # fmt: skip
    """One dashed line per network form; over its settings' x range when ``span`` maps
    settings to (low, high) x, across the panel otherwise; with ``only``, just the forms of
    those settings."""
    styles = ["--", "-.", ":"]
    for i, (label, settings, accs) in enumerate(reference_forms(results)):
        if not accs or (only is not None and not set(settings) & only):
            continue
        y = 100 * sum(accs) / len(accs)
        style = dict(ls=styles[i % len(styles)], color=str(0.2 + 0.2 * (i % 3)), label=label)
        spans = [span[s] for s in settings if s in span] if span is not None else []
        if not spans:
            ax.axhline(y, **style)
        else:
            lows, highs = zip(*spans, strict=True)
            ax.hlines(y, min(lows), max(highs), **style)


def figure(spec: StudySpec, results: StudyResults, path: Path) -> None:
    """Mean test accuracy against bit width with 95% interval bars, one line per method (per
    method and optimizer when the study varies optimizers; at :func:`bits_budget` when it
    varies budgets); the full-precision references as one line per network form."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    top_budget = bits_budget(results)
    optimizers = results.optimizers or [None]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    lines = [(m.name, o) for o in optimizers for m in spec.methods]
    for i, (method, optimizer) in enumerate(lines):
        cells = sorted(
            (c for c in results.cells if c.method == method and c.n > 0
             and c.budget == top_budget and c.optimizer == optimizer),
            key=lambda c: c.bits,
        )  # fmt: skip
        if not cells:
            continue
        xs = [c.bits * (1 + 0.015 * (i - len(lines) / 2)) for c in cells]
        _errorbar(ax, xs, cells, method if optimizer is None else f"{method}, {optimizer}")
    bits = {s.row: (s.bits / 1.25, s.bits * 1.25) for s in spec.settings}
    _draw_references(ax, results, bits)
    ax.set_xscale("log", base=2)
    widths = sorted({s.bits for s in spec.settings})
    ax.set_xticks(widths, [f"{b:g}" for b in widths])
    ax.minorticks_off()
    budget = f", budget {top_budget:g}" if top_budget is not None else ""
    ax.set_xlabel(f"bits (W/A); 1 bit in BinaryNet form{budget}")
    ax.set_ylabel("test accuracy (%), mean and 95% CI over seeds")
    ax.set_title(spec.name)
    ax.legend(fontsize=8)
    _save(fig, path)


def bits_budget(results: StudyResults) -> float | None:
    """The budget of the accuracy-against-bits figure: the one most settings ran (the
    largest of those on a tie), so that every bit width is drawn at the same budget; None
    when the study does not vary budgets."""
    rows: dict[float, set[str]] = {}
    for c in results.cells:
        if c.budget is not None:
            rows.setdefault(c.budget, set()).add(c.setting)
    if not rows:
        return None
    return max(rows, key=lambda b: (len(rows[b]), b))


def _errorbar(ax: Any, xs: list[float], cells: list[CellRow], label: str) -> None:
    ys = [100 * c.mean for c in cells]
    err = [
        [100 * (c.mean - c.low) if c.low is not None else 0 for c in cells],
        [100 * (c.high - c.mean) if c.high is not None else 0 for c in cells],
    ]
    ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=label)


def _save(fig: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    atomic_write(path, lambda f: f.write(buf.getvalue()))


def budget_figure(spec: StudySpec, results: StudyResults, path: Path) -> None:
    """Mean test accuracy against training budget (log axis), one line per method and
    row run at two or more budgets, one panel per optimizer; the
    full-precision references of their network forms as one line each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    optimizers = results.optimizers or [None]
    fig, axes = plt.subplots(1, len(optimizers), figsize=(6.4 * len(optimizers), 4.2),
                             squeeze=False, sharey=True)  # fmt: skip
    budgets_of: dict[str, set[float]] = {}
    for c in results.cells:
        if c.budget is not None:
            budgets_of.setdefault(c.setting, set()).add(c.budget)
    rows = [r for r in dict.fromkeys(s.row for s in spec.settings)
            if len(budgets_of.get(r, ())) > 1]  # fmt: skip
    ticks = sorted(set().union(*(budgets_of[r] for r in rows))) if rows else []
    for ax, optimizer in zip(axes[0], optimizers, strict=True):
        for row in rows:
            for method in spec.methods:
                cells = sorted(
                    (c for c in results.cells if (c.setting, c.method, c.optimizer)
                     == (row, method.name, optimizer) and c.n > 0
                     and c.budget is not None),
                    key=lambda c: c.budget,
                )  # fmt: skip
                if len(cells) > 1:  # a method run at one budget only is in the tables
                    label = method.name if len(rows) == 1 else f"{method.name}, {row}"
                    _errorbar(ax, [c.budget for c in cells], cells, label)
        ran = {c.setting for c in results.cells if c.optimizer == optimizer and c.n > 0}
        _draw_references(ax, results, None, only=set(rows) & ran if ran else set(rows))
        if ticks and min(ticks) > 0:
            ax.set_xscale("log")
            ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
            ax.minorticks_off()
        ax.set_xlabel("training budget (log scale)")
        ax.set_ylabel("test accuracy (%), mean and 95% CI over seeds")
        ax.set_title(f"{spec.name}: {optimizer or 'one optimizer'}", fontsize=10)
        ax.legend(fontsize=7)
    _save(fig, path)


def lr_figure(spec: StudySpec, results: StudyResults, path: Path) -> None:
    """Each method's learning-rate sensitivity from its tuning trials: validation accuracy
    against the trial's LR (log axis), one panel per tuned condition; completed trials as
    filled markers joined in LR order, pruned ones hollow, the best one ringed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    # a cell with knobs from another setting repeats that setting's trials: drawn once
    tuned = [c for c in results.cells if c.knobs_from is None
             and any("trainer.lr" in t.params for t in c.trials)]  # fmt: skip
    conditions = list(dict.fromkeys(c.condition for c in tuned))
    cols = min(3, len(conditions))
    rows = -(-len(conditions) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.8 * rows), squeeze=False)
    for ax, cond in zip(axes.flat, conditions, strict=False):
        for i, cell in enumerate(c for c in tuned if c.condition == cond):
            color = f"C{i % 10}"
            done = sorted((t.params["trainer.lr"], 100 * t.val_acc) for t in cell.trials
                          if t.state == "complete" and t.val_acc is not None
                          and "trainer.lr" in t.params)  # fmt: skip
            pruned = [(t.params["trainer.lr"], 100 * t.val_acc) for t in cell.trials
                      if t.state == "pruned" and t.val_acc is not None
                      and "trainer.lr" in t.params]  # fmt: skip
            if done:
                ax.plot(*zip(*done, strict=True), "o-", color=color, label=cell.method, ms=4)
            if pruned:
                ax.plot(*zip(*pruned, strict=True), "o", mfc="none", color=color, ms=4)
            best = (cell.best_params or {}).get("trainer.lr")
            if best is not None and cell.best_val is not None:
                ax.plot([best], [100 * cell.best_val], "o", mfc="none", mec="k", ms=9)
        ax.set_xscale("log")
        # 1-3-10 ticks in plain numbers: a panel spanning about a decade otherwise labels
        # every minor tick in scientific notation, on top of each other
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 3.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("learning rate (trainer.lr)")
        ax.set_ylabel("validation accuracy (%)")
        ax.set_title(condition_words(*cond), fontsize=9)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(conditions):]:
        ax.set_visible(False)
    fig.suptitle(f"{spec.name}: tuning trials (hollow: pruned; ringed: chosen)", fontsize=10)
    _save(fig, path)
