"""`qexp compare DIR... [--out OUTDIR] [--x {bits,weight_kb,bops}]`: accuracy against bit width
(or weight memory, or bit operations) across runs and sweeps.

Finds every run under the given dirs, averages test accuracy over seeds for each
(estimator, quantizer, bit width, ...) and writes:

* ``compare.csv`` and ``compare.md``: the table (also printed);
* ``accuracy_vs_bits.png``: accuracy against weight bits, one line per estimator, error bars =
  sample std over seeds, the full-precision runs as a dashed horizontal line;
* ``tensorboard/``: one TensorBoard run per estimator with ``compare/test_acc`` (and
  ``_std``, ``_min``, ``_max``) at step = bit width, one flat ``full_precision`` run, the
  figure (the Time Series view's first card) and the table (Text tab).

With ``--x weight_kb`` the figure is ``accuracy_vs_weight_kb.png`` instead: accuracy against
each group's mean ``weight_kb`` (metrics.json), one line per estimator + quantizer whatever
their other settings (so a budget sweep, where every run has the same nominal bits, is one
line), sorted by KB; and TensorBoard gets ``compare/test_acc_vs_kb`` (and ``_std``) at step =
round(weight_kb). ``--x bops`` does the same with each group's mean ``bops`` (bit operations
per sample, qexp.quant.cost) on a log axis, in ``accuracy_vs_bops.png``. On both cost axes the
figure rings the Pareto front: the points no other point beats on both accuracy and cost. The
tables are the same in all modes.
"""

from __future__ import annotations

import argparse
import csv
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qexp.errors import QexpError
from qexp.report.runs import Group, Skipped, find_runs, group_runs, skipped_reasons

FIGURE_NAME = "accuracy_vs_bits.png"
#: figure file per --x choice
FIGURE_NAMES = {
    "bits": FIGURE_NAME,
    "weight_kb": "accuracy_vs_weight_kb.png",
    "bops": "accuracy_vs_bops.png",
}
X_CHOICES = tuple(FIGURE_NAMES)
_X_WORDS = {"bits": "bit width", "weight_kb": "weight memory", "bops": "bit operations"}
_X_LABELS = {
    "bits": "weight bits (w_bits)",
    "weight_kb": "weight memory (KB)",
    "bops": "bit operations per sample (BOPs = MACs x w_bits x a_bits)",
}
CSV_NAME = "compare.csv"
MD_NAME = "compare.md"
TB_DIR = "tensorboard"
#: marks a tensorboard dir this command may wipe and rewrite (and `qexp tb` recognises)
TB_MARKER = ".qexp_compare"
STD_NOTE = "std = sample standard deviation over seeds (ddof=1); 0 for a single run"


# -- table ----------------------------------------------------------------------------------
def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def table_rows(groups: list[Group], extras: list[str]) -> tuple[list[str], list[list[Any]]]:
    """Header and raw rows (numbers unrounded) of the comparison table."""
    header = [
        "dataset",
        "model",
        "quantizer",
        "estimator",
        *extras,
        "w_bits",
        "a_bits",
        "runs",
        "seeds",
        "test_acc_mean",
        "test_acc_std",
        "test_acc_min",
        "test_acc_max",
        "weight_kb",
        "train_time_s",
    ]
    rows = []
    for g in groups:
        rows.append(
            [
                g.dataset,
                g.model,
                g.quantizer,
                g.estimator,
                *(g.extras[k] for k in extras),
                g.w_bits,
                g.a_bits,
                g.n,
                " ".join(str(s) for s in g.seeds),
                g.mean,
                g.std,
                min(g.accs),
                max(g.accs),
                g.mean_of("weight_kb"),
                g.mean_of("train_time_s"),
            ]
        )
    return header, rows


def _display(header: list[str], rows: list[list[Any]]) -> tuple[list[str], list[list[str]]]:
    shown = [h.replace("test_acc_std", "test_acc_std*") for h in header]
    digits = {"weight_kb": 1, "train_time_s": 1}
    out = []
    for row in rows:
        out.append([_fmt(v, digits.get(h, 4)) for h, v in zip(header, row, strict=True)])
    return shown, out


def format_text(header: list[str], rows: list[list[Any]]) -> str:
    """Fixed-width table for the terminal."""
    shown, cells = _display(header, rows)
    widths = [
        max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(shown)
    ]
    lines = ["  ".join(h.ljust(w) for h, w in zip(shown, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    for r in cells:
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))
    lines.append(f"* {STD_NOTE}")
    return "\n".join(lines)


def format_markdown(
    header: list[str],
    rows: list[list[Any]],
    skipped: list[Skipped],
    figure: str | None,
    x: str = "bits",
) -> str:
    """The report as Markdown: table, std note, figure link, skipped runs."""
    shown, cells = _display(header, rows)
    lines = [f"# Accuracy against {_X_WORDS[x]}", ""]
    lines.append("| " + " | ".join(shown) + " |")
    lines.append("|" + "|".join("---" for _ in shown) + "|")
    for r in cells:
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in r) + " |")
    lines += ["", f"\\* {STD_NOTE}. test_acc: hard-quantized test accuracy of the best epoch.", ""]
    if figure:
        lines += [f"![accuracy against {_X_WORDS[x]}]({figure})", ""]
    if skipped:
        lines += [f"## {skipped_reasons(skipped)}", ""]
        lines += [f"- `{s.path}`: {s.reason}" for s in skipped]
        lines.append("")
    return "\n".join(lines)


def write_csv(header: list[str], rows: list[list[Any]], path: Path) -> None:
    """The table with full-precision numbers."""
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


# -- figure and TensorBoard -----------------------------------------------------------------
def _panels(groups: list[Group]) -> dict[tuple[str, str], list[Group]]:
    panels: dict[tuple[str, str], list[Group]] = {}
    for g in groups:
        panels.setdefault((str(g.dataset), str(g.model)), []).append(g)
    return panels


def _series_name(g: Group, many_quantizers: bool) -> str:
    """Line label: estimator (+ quantizer, + extra settings, + activation bits if not = w)."""
    name = f"{g.quantizer}/{g.estimator}" if many_quantizers else str(g.estimator)
    if g.extras:
        name += " (" + ", ".join(f"{k}={v}" for k, v in g.extras.items()) + ")"
    if g.a_bits != g.w_bits and not g.full_precision:
        name += f" a{g.a_bits}"
    return name


def series(groups: list[Group]) -> dict[tuple[str, str], dict[str, list[Group]]]:
    """panel (dataset, model) -> line name -> groups sorted by w_bits."""
    many_quantizers = len({g.quantizer for g in groups}) > 1
    out: dict[tuple[str, str], dict[str, list[Group]]] = {}
    for panel, members in _panels(groups).items():
        lines: dict[str, list[Group]] = {}
        for g in members:
            lines.setdefault(_series_name(g, many_quantizers), []).append(g)
        out[panel] = {k: sorted(v, key=lambda g: g.w_bits) for k, v in lines.items()}
    return out


Points = tuple[list[float], list[float], list[float]]


def plot_series(groups: list[Group], x: str = "bits") -> dict[tuple[str, str], dict[str, Points]]:
    """What the figure draws: panel (dataset, model) -> line name -> (xs, ys, yerrs).

    ys are the groups' mean test_acc, yerrs their sample std over seeds. ``x="bits"``: one line
    per :func:`series` line, x = w_bits. ``x="weight_kb"``: one line per estimator + quantizer
    (groups that differ in anything else, e.g. a budget, are points of the same line), x = the
    group's mean weight_kb; groups without weight_kb are left out (``x="bops"``: the same
    with the mean bops). Full-precision groups are
    never points (they are the reference line); lines without points are left out.
    """
    if x not in X_CHOICES:
        raise ValueError(f"x must be one of {', '.join(X_CHOICES)}, not {x!r}")
    out: dict[tuple[str, str], dict[str, Points]] = {}
    if x == "bits":
        for panel, named in series(groups).items():
            lines: dict[str, list[tuple[float, Group]]] = {
                name: [(float(g.w_bits), g) for g in gs if not g.full_precision]
                for name, gs in named.items()
            }
            out[panel] = _points(lines)
        return out
    many_quantizers = len({g.quantizer for g in groups}) > 1
    for panel, members in _panels(groups).items():
        by_line: dict[str, list[tuple[float, Group]]] = {}
        for g in members:
            cost = g.mean_of(x)
            if g.full_precision or cost is None:
                continue
            name = f"{g.quantizer}/{g.estimator}" if many_quantizers else str(g.estimator)
            by_line.setdefault(name, []).append((cost, g))
        out[panel] = _points(by_line)
    return out


def _points(lines: dict[str, list[tuple[float, Group]]]) -> dict[str, Points]:
    out: dict[str, Points] = {}
    for name, pts in lines.items():
        if not pts:
            continue
        pts = sorted(pts, key=lambda p: p[0])
        out[name] = ([p[0] for p in pts], [p[1].mean for p in pts], [p[1].std for p in pts])
    return out


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the (cost, accuracy) points that no other point beats on both (lower or
    equal cost and higher or equal accuracy, strictly better in one), sorted by cost."""

    def beaten(c: float, a: float) -> bool:
        return any(c2 <= c and a2 >= a and (c2 < c or a2 > a) for c2, a2 in points)

    front = [i for i, (c, a) in enumerate(points) if not beaten(c, a)]
    return sorted(front, key=lambda i: points[i][0])


def _mark_pareto(ax: Any, lines: dict[str, Points]) -> None:
    """Ring the Pareto-front points of one panel and join them with a dotted step line."""
    pts = [(c, a) for xs, ys, _ in lines.values() for c, a in zip(xs, ys, strict=True)]
    front = [pts[i] for i in pareto_front(pts)]
    if not front:
        return
    cs, accs = [p[0] for p in front], [p[1] for p in front]
    ax.plot(cs, accs, color="0.2", linestyle=":", linewidth=1, drawstyle="steps-post")
    ax.scatter(
        cs,
        accs,
        s=160,
        facecolors="none",
        edgecolors="crimson",
        linewidths=1.5,
        zorder=5,
        label=f"Pareto front ({len(front)})",
    )


def _reference(members: list[Group]) -> tuple[float, float, int] | None:
    """Mean, sample std and count of all full-precision runs of a panel (any estimator)."""
    accs = [a for g in members if g.full_precision for a in g.accs]
    if not accs:
        return None
    import statistics

    std = statistics.stdev(accs) if len(accs) > 1 else 0.0
    return statistics.fmean(accs), std, len(accs)


def plot(groups: list[Group], path: Path, x: str = "bits"):
    """Accuracy against weight bits (or weight_kb), one panel per (dataset, model); returns
    the figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = plot_series(groups, x)
    panels = _panels(groups)
    fig, axes = plt.subplots(1, len(panels), figsize=(6.4 * len(panels), 4.6), squeeze=False)
    for ax, (panel, members) in zip(axes[0], panels.items(), strict=True):
        ticks: set[int] = set()
        for name, (xs, ys, yerrs) in lines[panel].items():
            if x == "bits":
                ticks.update(int(v) for v in xs)
            ax.errorbar(xs, ys, yerr=yerrs, marker="o", capsize=3, label=name)
        ref = _reference(members)
        if ref is not None:
            mean, std, n = ref
            ax.axhline(
                mean, color="0.3", linestyle="--", label=f"full precision {mean:.3f} ({n} runs)"
            )
            if std > 0:
                ax.axhspan(mean - std, mean + std, color="0.5", alpha=0.12, linewidth=0)
        if x != "bits":
            _mark_pareto(ax, lines[panel])
        if x == "bops":
            ax.set_xscale("log")
        if ticks:
            ax.set_xscale("log", base=2)
            ax.set_xticks(sorted(ticks))
            ax.set_xticklabels([str(t) for t in sorted(ticks)])
            ax.minorticks_off()
        ax.set_xlabel(_X_LABELS[x])
        ax.set_ylabel("test accuracy (hard-quantized)")
        ax.set_title(f"{panel[0]} / {panel[1]}: mean ± sample std over seeds", fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return fig


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "_.=-" else "_" for c in name).strip("_") or "run"


FP_RUN = "full_precision"
#: scalar tag of the lines per --x choice (``_std``, ``_min``, ``_max`` are appended)
_TB_TAGS = {"bits": "compare/test_acc", "weight_kb": "compare/test_acc_vs_kb"}
#: the Text tab: the figure's numbers (x="bits": estimator x bit width) and compare.md
PIVOT_TAG = "compare/accuracy_vs_bits"
TABLE_TAG = "compare/table"


@dataclass
class TbLine:
    """One TensorBoard run of the compare folder: points at integer steps (bits or KB)."""

    run: str
    steps: list[int]
    means: list[float]
    stds: list[float]
    #: lowest and highest run per point (None with x="weight_kb": its lines pool groups)
    mins: list[float] | None
    maxs: list[float] | None


def tensorboard_lines(groups: list[Group], x: str = "bits") -> list[TbLine]:
    """What the compare folder's TensorBoard runs hold: one run per line of the figure, and
    per panel one ``full_precision`` run when full-precision runs exist.

    ``x="bits"``: steps are the bit widths of the quantized groups (full-precision groups are
    never points of an estimator's line). ``x="weight_kb"``: steps are the figure's KB
    rounded to integers (TensorBoard steps are integers). The full-precision run is flat: the
    mean of all the panel's full-precision runs at every step the panel's lines have (at 32
    when it has none), so it reads as the reference across the range. Lines with no point
    are left out.
    """
    panels = _panels(groups)
    many_panels = len(panels) > 1
    named = series(groups) if x == "bits" else {}
    points = plot_series(groups, x) if x != "bits" else {}
    out: list[TbLine] = []
    for panel, members in panels.items():
        prefix = f"{_safe('_'.join(panel))}/" if many_panels else ""
        lines: list[TbLine] = []
        if x == "bits":
            for name, gs in named[panel].items():
                gs = [g for g in gs if not g.full_precision]
                if gs:
                    lines.append(
                        TbLine(
                            f"{prefix}{_safe(name)}",
                            [int(g.w_bits) for g in gs],
                            [g.mean for g in gs],
                            [g.std for g in gs],
                            [min(g.accs) for g in gs],
                            [max(g.accs) for g in gs],
                        )
                    )
        else:
            for name, (xs, ys, yerrs) in points[panel].items():
                steps = [round(v) for v in xs]
                lines.append(TbLine(f"{prefix}{_safe(name)}", steps, ys, yerrs, None, None))
        ref = _reference(members)
        if ref is not None:
            mean, std, _ = ref
            accs = [a for g in members if g.full_precision for a in g.accs]
            steps = sorted({s for line in lines for s in line.steps}) or [32]
            k = len(steps)
            bounds = ([min(accs)] * k, [max(accs)] * k) if x == "bits" else (None, None)
            out.append(TbLine(f"{prefix}{FP_RUN}", steps, [mean] * k, [std] * k, *bounds))
        out.extend(lines)
    return out


def pivot_markdown(groups: list[Group]) -> str:
    """The figure as a table: one row per line, one column per weight bit width, cells
    "mean ± std (n)"; the full-precision reference as the last row of each panel."""
    out: list[str] = []
    for panel, named in series(groups).items():
        members = _panels(groups)[panel]
        bits = sorted({int(g.w_bits) for g in members if not g.full_precision}) or [32]
        out += [f"**{panel[0]} / {panel[1]}**: test accuracy (hard-quantized), mean ± sample "
                "std over seeds (runs)", ""]  # fmt: skip
        out.append("| | " + " | ".join(f"w{b}" for b in bits) + " |")
        out.append("|---|" + "---:|" * len(bits))
        for name, gs in named.items():
            cells = {int(g.w_bits): g for g in gs if not g.full_precision}
            if not cells:
                continue
            row = [f"{c.mean:.4f} ± {c.std:.4f} ({c.n})" if (c := cells.get(b)) else "-"
                   for b in bits]  # fmt: skip
            out.append(f"| {name} | " + " | ".join(row) + " |")
        ref = _reference(members)
        if ref is not None:
            mean, std, n = ref
            cell = f"{mean:.4f} ± {std:.4f} ({n})"
            out.append("| full precision | " + " | ".join(cell for _ in bits) + " |")
        out.append("")
    return "\n".join(out)


def write_tensorboard(
    groups: list[Group], fig: Any, out: Path, x: str = "bits", table: str | None = None
) -> Path:
    """The compare folder for TensorBoard: the runs of :func:`tensorboard_lines`, and the
    figure (first card of the Time Series view) and the tables (Text tab: the figure's
    numbers, :func:`pivot_markdown`, and ``table``, compare.md) in the first run.

    The figure and the tables are the exact view: TensorBoard smooths scalar series by
    default (Smoothing 0.6), which bends lines of a few points; the raw values are in each
    chart's tooltip ("Value").

    Tags with ``x="bits"``: ``compare/test_acc`` (mean over seeds), ``_std``, ``_min`` and
    ``_max`` at step = weight bits; with ``x="weight_kb"``: ``compare/test_acc_vs_kb`` and
    ``_std`` at step = round(weight_kb). The figure rides on an existing run: TensorBoard
    lists every run folder in its run selectors, so a run holding only the figure would sit
    there empty.
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
    tag = _TB_TAGS.get(x, f"compare/test_acc_vs_{x}")
    pivot = pivot_markdown(groups) if x == "bits" else None
    for i, line in enumerate(tensorboard_lines(groups, x)):
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
                writer.add_figure(f"compare/{Path(FIGURE_NAMES[x]).stem}", fig, step, close=False)
            if pivot is not None:
                writer.add_text(PIVOT_TAG, pivot, step)
            if table is not None:
                writer.add_text(TABLE_TAG, table, step)
        writer.close()
    return tb


# -- command --------------------------------------------------------------------------------
def compare(
    dirs: list[Path], out: Path, tensorboard: bool = True, x: str = "bits"
) -> dict[str, Any]:
    """Build the report for ``dirs`` into ``out``; returns paths and the groups.

    ``x``: the figure's x axis, ``"bits"`` (w_bits), ``"weight_kb"`` (mean weight memory) or
    ``"bops"`` (mean bit operations per sample).
    """
    if x not in X_CHOICES:
        raise QexpError(f"--x must be one of {', '.join(X_CHOICES)}, not {x!r}")
    missing = [str(d) for d in dirs if not d.is_dir()]
    if missing:
        raise QexpError(f"no such directory: {', '.join(missing)}")
    runs, skipped = find_runs(dirs)
    result: dict[str, Any] = {"runs": runs, "skipped": skipped, "groups": []}
    if not runs:
        return result
    groups, extras = group_runs(runs)
    header, rows = table_rows(groups, extras)
    out.mkdir(parents=True, exist_ok=True)
    figure = FIGURE_NAMES[x]
    fig = plot(groups, out / figure, x)
    write_csv(header, rows, out / CSV_NAME)
    (out / MD_NAME).write_text(format_markdown(header, rows, skipped, figure, x))
    result.update(
        groups=groups,
        header=header,
        rows=rows,
        csv=out / CSV_NAME,
        markdown=out / MD_NAME,
        figure=out / figure,
    )
    if x != "bits":
        # groups that cannot be placed on the cost axis (metrics.json without that key)
        result["no_x_value"] = [g for g in groups if not g.full_precision and g.mean_of(x) is None]
    if tensorboard:
        table = format_markdown(header, rows, skipped, None, x)
        result["tensorboard"] = write_tensorboard(groups, fig, out, x, table)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return result


def main(argv: list[str]) -> int:
    """`qexp compare DIR... [--out OUTDIR] [--x {bits,weight_kb,bops}] [--no-tensorboard]`."""
    parser = argparse.ArgumentParser(
        prog="qexp compare",
        description="Average test accuracy over seeds per estimator, quantizer and bit width, "
        "for every run found under DIR (runs and sweeps, at any depth).",
    )
    parser.add_argument("dirs", nargs="+", type=Path, metavar="DIR")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output folder (default: DIR/compare for one DIR, ./compare for several)",
    )
    parser.add_argument(
        "--x",
        choices=X_CHOICES,
        default="bits",
        help="x axis of the figure: weight bits (default), or each group's mean weight "
        "memory in KB (e.g. for a weight-budget sweep) or bit operations (BOPs) from "
        "metrics.json, with the Pareto front marked",
    )
    parser.add_argument(
        "--no-tensorboard", action="store_true", help="skip the TensorBoard summary"
    )
    args = parser.parse_args(argv)
    out = args.out or (args.dirs[0] / "compare" if len(args.dirs) == 1 else Path("compare"))
    try:
        result = compare(args.dirs, out, tensorboard=not args.no_tensorboard, x=args.x)
    except QexpError as exc:
        print(f"qexp: error: {exc}", file=sys.stderr)
        return 2
    skipped = result["skipped"]
    if not result["runs"]:
        print(f"qexp compare: no completed runs under {', '.join(map(str, args.dirs))}")
        if skipped:
            print(skipped_reasons(skipped))
            for s in skipped:
                print(f"  {s.path}: {s.reason}")
        return 1
    print(format_text(result["header"], result["rows"]))
    repeated = [g for g in result["groups"] if len(set(g.seeds)) < g.n]
    if repeated:
        # the same config and seed twice (copied run dirs, or two sweeps given together)
        print(f"note: {len(repeated)} groups hold the same seed more than once")
    if result.get("no_x_value"):
        print(f"note: {len(result['no_x_value'])} groups have no {args.x} and are not plotted")
    if skipped:
        print()
        print(skipped_reasons(skipped))
        for s in skipped:
            print(f"  {s.path}: {s.reason}")
    print()
    print(f"{len(result['runs'])} runs in {len(result['groups'])} groups; wrote")
    for key in ("csv", "markdown", "figure", "tensorboard"):
        if key in result:
            print(f"  {result[key]}")
    if "tensorboard" in result:
        print(f"view with: qexp tb {result['tensorboard']}")
    return 0
