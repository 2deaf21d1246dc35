"""The TensorBoard folder of `qexp compare`: one run per figure line, a flat full-precision
run per panel, the figure and the tables."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qexp.bitwidth import as_bits, bits_label
from qexp.errors import QexpError
from qexp.report.axes import TEST_ACC, Axis, Metric
from qexp.report.lines import line_groups, panels, reference, series
from qexp.report.runs import Group

TB_DIR = "tensorboard"
#: marks a tensorboard dir this command may wipe and rewrite (and `qexp tb` recognises)
TB_MARKER = ".qexp_compare"
FP_RUN = "full_precision"
TABLE_TAG = "compare/table"


def pivot_tag(metric: Metric) -> str:
    """The Text tab's tag of :func:`pivot_markdown` (compare/accuracy_vs_bits)."""
    return f"compare/{metric.file_word}_vs_bits"


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "_.=-" else "_" for c in name).strip("_") or "run"


@dataclass
class TbLine:
    """One TensorBoard run of the compare folder: points at integer steps (bits or cost)."""

    run: str
    steps: list[int]
    means: list[float]
    stds: list[float]
    #: lowest and highest run per point (None on a cost axis: its lines pool groups)
    mins: list[float] | None
    maxs: list[float] | None


def tensorboard_lines(groups: list[Group], axis: Axis) -> list[TbLine]:
    """What the compare folder's TensorBoard runs hold: one run per line of the figure, and
    per panel one ``full_precision`` run when full-precision runs exist.

    Steps are the lines' places on the axis rounded to integers (TensorBoard steps are
    integers). The full-precision run is flat: the mean of all the panel's full-precision
    runs at every step the panel's lines have (at 32 when it has none), so it reads as the
    reference across the range. Lines with no point are left out.
    """
    members_of = panels(groups)
    many_panels = len(members_of) > 1
    named = line_groups(groups, axis)
    out: list[TbLine] = []
    for panel, members in members_of.items():
        prefix = f"{_safe('_'.join(panel))}/" if many_panels else ""
        lines: list[TbLine] = []
        for name, gs in named[panel].items():
            bounds = (None, None) if axis.cost else ([min(g.values) for g in gs],
                                                     [max(g.values) for g in gs])  # fmt: skip
            lines.append(
                TbLine(
                    f"{prefix}{_safe(name)}",
                    [round(axis.value(g)) for g in gs],
                    [g.mean for g in gs],
                    [g.std for g in gs],
                    *bounds,
                )
            )
        ref = reference(members)
        if ref is not None:
            steps = sorted({s for line in lines for s in line.steps}) or [32]
            k = len(steps)
            bounds = (None, None) if axis.cost else ([ref.low] * k, [ref.high] * k)
            out.append(TbLine(f"{prefix}{FP_RUN}", steps, [ref.mean] * k, [ref.std] * k, *bounds))
        out.extend(lines)
    return out


def pivot_markdown(groups: list[Group], metric: Metric = TEST_ACC) -> str:
    """The bit-width figure as a table: one row per line, one column per weight bit width,
    cells "mean ± std (n)"; the full-precision reference as the last row of each panel."""
    out: list[str] = []
    members_of = panels(groups)
    d = metric.digits
    for panel, named in series(groups).items():
        members = members_of[panel]
        bits = sorted({as_bits(g.w_bits) for g in members if not g.full_precision}) or [32]
        out += [f"**{panel[0]} / {panel[1]}**: {metric.label}, mean ± sample std over seeds "
                "(runs)", ""]  # fmt: skip
        out.append("| | " + " | ".join(f"w{bits_label(b)}" for b in bits) + " |")
        out.append("|---|" + "---:|" * len(bits))
        for name, gs in named.items():
            cells = {as_bits(g.w_bits): g for g in gs if not g.full_precision}
            if not cells:
                continue
            row = [f"{c.mean:.{d}f} ± {c.std:.{d}f} ({c.n})" if (c := cells.get(b)) else "-"
                   for b in bits]  # fmt: skip
            out.append(f"| {name} | " + " | ".join(row) + " |")
        ref = reference(members)
        if ref is not None:
            cell = f"{ref.mean:.{d}f} ± {ref.std:.{d}f} ({ref.n})"
            out.append("| full precision | " + " | ".join(cell for _ in bits) + " |")
        out.append("")
    return "\n".join(out)


def write_tensorboard(
    groups: list[Group],
    fig: Any,
    out: Path,
    axis: Axis,
    metric: Metric = TEST_ACC,
    table: str | None = None,
) -> Path:
    """The compare folder for TensorBoard: the runs of :func:`tensorboard_lines`, and the
    figure (first card of the Time Series view) and the tables (Text tab: the figure's
    numbers, :func:`pivot_markdown`, on the bit-width axis, and ``table``, compare.md) in
    the first run.

    The figure and the tables are the exact view: TensorBoard smooths scalar series by
    default (Smoothing 0.6), which bends lines of a few points; the raw values are in each
    chart's tooltip ("Value").

    Tags: :meth:`Axis.tb_tag` (``compare/test_acc`` on bits, ``compare/test_acc_vs_kb`` on
    weight_kb), its ``_std``, and on the bit-width axis ``_min`` and ``_max``. The figure
    rides on an existing run: TensorBoard lists every run folder in its run selectors, so a
    run holding only the figure would sit there empty.
    """
    from torch.utils.tensorboard import SummaryWriter

    tb = out / TB_DIR
    if tb.exists() and any(tb.iterdir()):
        if not (tb / TB_MARKER).exists():
            raise QexpError(
                f"{tb} exists and was not written by qexp compare: choose another --out"
            )
        shutil.rmtree(tb)  # stale event files would double every point
    tb.mkdir(parents=True, exist_ok=True)
    (tb / TB_MARKER).write_text("written by `qexp compare`; rewritten on every run\n")
    tag = axis.tb_tag(metric)
    pivot = pivot_markdown(groups, metric) if not axis.cost else None
    for i, line in enumerate(tensorboard_lines(groups, axis)):
        writer = SummaryWriter(str(tb / line.run))
        for j, step in enumerate(line.steps):
            writer.add_scalar(tag, line.means[j], step)
            writer.add_scalar(f"{tag}_std", line.stds[j], step)
            if line.mins is not None and line.maxs is not None:
                writer.add_scalar(f"{tag}_min", line.mins[j], step)
                writer.add_scalar(f"{tag}_max", line.maxs[j], step)
        if i == 0:
            step = line.steps[0]
            if fig is not None:
                # "compare/accuracy_vs_..." sorts before the scalars: the first card
                figure_tag = f"compare/{Path(axis.figure_name(metric)).stem}"
                writer.add_figure(figure_tag, fig, step, close=False)
            if pivot is not None:
                writer.add_text(pivot_tag(metric), pivot, step)
            if table is not None:
                writer.add_text(TABLE_TAG, table, step)
        writer.close()
    return tb
