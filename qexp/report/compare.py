"""`qexp compare DIR... [--out OUTDIR] [--x {bits,weight_kb,bops}] [--metric KEY]`: a run
metric (test accuracy, or what the runs' task reports) against bit width, weight memory or bit
operations, across runs and sweeps.

Finds every run under the given dirs, averages the metric over seeds for each (estimator,
quantizer, bit width, ...) and writes:

* ``compare.csv`` and ``compare.md``: the table (also printed; qexp.report.table);
* ``accuracy_vs_bits.png``: the metric against weight bits, one line per estimator, error bars
  = sample std over seeds, the full-precision runs as a dashed horizontal line
  (qexp.report.figure);
* ``tensorboard/``: one TensorBoard run per line with ``compare/test_acc`` (and ``_std``,
  ``_min``, ``_max``) at step = bit width, one flat ``full_precision`` run, the figure (the
  Time Series view's first card) and the table (Text tab) (qexp.report.tb_summary).

With ``--x weight_kb`` the figure is ``accuracy_vs_weight_kb.png`` instead: the metric against
each group's mean ``weight_kb`` (metrics.json), one line per estimator + quantizer whatever
their other settings (so a budget sweep, where every run has the same nominal bits, is one
line), sorted by KB; and TensorBoard gets ``compare/test_acc_vs_kb`` (and ``_std``) at step =
round(weight_kb). ``--x bops`` does the same with each group's mean ``bops`` (bit operations
per sample, qexp.quant.cost) on a log axis, in ``accuracy_vs_bops.png``. On both cost axes the
figure rings the Pareto front: the points no other point beats on both the metric and cost.
The tables are the same in all modes. The axes and metrics are described in qexp.report.axes.

The metric: ``--metric`` (test_acc, test_bpc, test_loss), by default ``test_acc`` when some run
reports it, else the first of the others that some run reports (a language model's bits per
character); file names and tags follow it (``bpc_vs_bits.png``, ``compare/test_bpc``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from qexp.errors import QexpError
from qexp.report.axes import AXES, METRICS, TEST_ACC, Axis, Metric, axis, metric
from qexp.report.figure import plot
from qexp.report.lines import pareto_front, plot_series
from qexp.report.runs import find_runs, group_runs, reported_metric, skipped_reasons
from qexp.report.table import format_markdown, format_text, table_rows, write_csv
from qexp.report.tb_summary import TB_MARKER, write_tensorboard

__all__ = ["TB_MARKER", "compare", "main", "pareto_front", "plot_series"]

CSV_NAME = "compare.csv"
MD_NAME = "compare.md"


def choose_metric(dirs: list[Path], key: str | None) -> Metric:
    """``key``'s metric, or by default the first metric some run under ``dirs`` reports
    (test_acc when none does: the no-runs message then reads as before)."""
    if key is not None:
        return metric(key)
    found = reported_metric(dirs, list(METRICS))
    return METRICS[found] if found is not None else TEST_ACC


def compare(
    dirs: list[Path],
    out: Path,
    tensorboard: bool = True,
    x: str = "bits",
    metric_key: str | None = None,
) -> dict[str, Any]:
    """Build the report for ``dirs`` into ``out``; returns paths and the groups.

    ``x``: the figure's x axis, ``"bits"`` (w_bits), ``"weight_kb"`` (mean weight memory) or
    ``"bops"`` (mean bit operations per sample). ``metric_key``: the metrics.json key to
    summarise (default: :func:`choose_metric`).
    """
    ax: Axis = axis(x)
    missing = [str(d) for d in dirs if not d.is_dir()]
    if missing:
        raise QexpError(f"no such directory: {', '.join(missing)}")
    m = choose_metric(dirs, metric_key)
    runs, skipped = find_runs(dirs, (m.key,))
    result: dict[str, Any] = {"runs": runs, "skipped": skipped, "groups": [], "metric": m}
    if not runs:
        return result
    groups, extras = group_runs(runs, m.key)
    header, rows = table_rows(groups, extras, m)
    out.mkdir(parents=True, exist_ok=True)
    figure = ax.figure_name(m)
    fig = plot(groups, out / figure, ax, m)
    write_csv(header, rows, out / CSV_NAME)
    (out / MD_NAME).write_text(format_markdown(header, rows, skipped, figure, ax, m))
    result.update(
        groups=groups,
        header=header,
        rows=rows,
        csv=out / CSV_NAME,
        markdown=out / MD_NAME,
        figure=out / figure,
    )
    if ax.cost:
        # groups that cannot be placed on the cost axis (metrics.json without that key)
        result["no_x_value"] = [g for g in groups if not g.full_precision and ax.value(g) is None]
    if tensorboard:
        table = format_markdown(header, rows, skipped, None, ax, m)
        result["tensorboard"] = write_tensorboard(groups, fig, out, ax, m, table)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return result


def _print_skipped(skipped: list) -> None:
    print(skipped_reasons(skipped))
    for s in skipped:
        print(f"  {s.path}: {s.reason}")


def main(argv: list[str]) -> int:
    """`qexp compare DIR... [--out OUTDIR] [--x {bits,weight_kb,bops}] [--metric KEY]
    [--no-tensorboard]`."""
    parser = argparse.ArgumentParser(
        prog="qexp compare",
        description="Average test accuracy (or the runs' metric) over seeds per estimator, "
        "quantizer and bit width, for every run found under DIR (runs and sweeps, at any depth).",
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
        choices=tuple(AXES),
        default="bits",
        help="x axis of the figure: weight bits (default), or each group's mean weight "
        "memory in KB (e.g. for a weight-budget sweep) or bit operations (BOPs) from "
        "metrics.json, with the Pareto front marked",
    )
    parser.add_argument(
        "--metric",
        choices=tuple(METRICS),
        default=None,
        help="the run result to compare (default: test_acc when the runs report it, else "
        "test_bpc, else test_loss)",
    )
    parser.add_argument(
        "--no-tensorboard", action="store_true", help="skip the TensorBoard summary"
    )
    args = parser.parse_args(argv)
    out = args.out or (args.dirs[0] / "compare" if len(args.dirs) == 1 else Path("compare"))
    try:
        result = compare(args.dirs, out, not args.no_tensorboard, args.x, args.metric)
    except QexpError as exc:
        print(f"qexp: error: {exc}", file=sys.stderr)
        return 2
    skipped = result["skipped"]
    if not result["runs"]:
        print(f"qexp compare: no completed runs under {', '.join(map(str, args.dirs))}")
        if skipped:
            _print_skipped(skipped)
        return 1
    print(format_text(result["header"], result["rows"], result["metric"]))
    repeated = [g for g in result["groups"] if len(set(g.seeds)) < g.n]
    if repeated:
        # the same config and seed twice (copied run dirs, or two sweeps given together)
        print(f"note: {len(repeated)} groups hold the same seed more than once")
    if result.get("no_x_value"):
        print(f"note: {len(result['no_x_value'])} groups have no {args.x} and are not plotted")
    if skipped:
        print()
        _print_skipped(skipped)
    print()
    print(f"{len(result['runs'])} runs in {len(result['groups'])} groups; wrote")
    for key in ("csv", "markdown", "figure", "tensorboard"):
        if key in result:
            print(f"  {result[key]}")
    if "tensorboard" in result:
        print(f"view with: qexp tb {result['tensorboard']}")
    return 0
