"""The figure of `qexp compare`: the metric against an axis, one panel per (dataset, model)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qexp.bitwidth import as_bits
from qexp.report.axes import TEST_ACC, Axis, Metric
from qexp.report.lines import Points, panels, pareto_front, plot_series, reference
from qexp.report.runs import Group


def _mark_pareto(ax: Any, lines: dict[str, Points], metric: Metric) -> None:
    """Ring the Pareto-front points of one panel and join them with a dotted step line."""
    pts = [(c, a) for xs, ys, _ in lines.values() for c, a in zip(xs, ys, strict=True)]
    front = [pts[i] for i in pareto_front(pts, metric.higher_is_better)]
    if not front:
        return
    cs, values = [p[0] for p in front], [p[1] for p in front]
    ax.plot(cs, values, color="0.2", linestyle=":", linewidth=1, drawstyle="steps-post")
    ax.scatter(
        cs,
        values,
        s=160,
        facecolors="none",
        edgecolors="crimson",
        linewidths=1.5,
        zorder=5,
        label=f"Pareto front ({len(front)})",
    )


def _scale(ax: Any, axis: Axis, xs: list[float]) -> None:
    """The axis' scale, and integer ticks at the points when it asks for them (and at 1.58,
    the ternary width, where a point sits there)."""
    ticks = sorted({as_bits(v) for v in xs}) if axis.integer_ticks else []
    if axis.integer_ticks and not ticks:
        return  # no point to place ticks at: matplotlib's linear default
    if axis.log_base is not None:
        ax.set_xscale("log", base=axis.log_base)
    if ticks:
        ax.set_xticks(ticks)
        ax.set_xticklabels([str(t) for t in ticks])
        ax.minorticks_off()


def plot(groups: list[Group], path: Path, axis: Axis, metric: Metric = TEST_ACC) -> Any:
    """The metric against ``axis``, one panel per (dataset, model), error bars = sample std
    over seeds, the full-precision runs as a dashed line with a +-1 std band; returns the
    figure (saved to ``path``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = plot_series(groups, axis)
    members_of = panels(groups)
    fig, axes = plt.subplots(1, len(members_of), figsize=(6.4 * len(members_of), 4.6),
                             squeeze=False)  # fmt: skip
    for ax, (panel, members) in zip(axes[0], members_of.items(), strict=True):
        xs_all: list[float] = []
        for name, (xs, ys, yerrs) in lines[panel].items():
            xs_all += xs
            ax.errorbar(xs, ys, yerr=yerrs, marker="o", capsize=3, label=name)
        ref = reference(members)
        if ref is not None:
            ax.axhline(ref.mean, color="0.3", linestyle="--",
                       label=f"full precision {ref.mean:.3f} ({ref.n} runs)")  # fmt: skip
            if ref.std > 0:
                ax.axhspan(ref.mean - ref.std, ref.mean + ref.std, color="0.5", alpha=0.12,
                           linewidth=0)  # fmt: skip
        if axis.cost:
            _mark_pareto(ax, lines[panel], metric)
        _scale(ax, axis, xs_all)
        ax.set_xlabel(axis.label)
        ax.set_ylabel(metric.label)
        ax.set_title(f"{panel[0]} / {panel[1]}: mean ± sample std over seeds", fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return fig
