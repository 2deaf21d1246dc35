"""The comparison table of `qexp compare`: one row per group, as text, Markdown and CSV."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from qexp.report.axes import TEST_ACC, Axis, Metric
from qexp.report.runs import Group, Skipped, skipped_reasons

STD_NOTE = "std = sample standard deviation over seeds (ddof=1); 0 for a single run"
#: columns shown with one decimal (the metric's columns use the metric's digits)
_ONE_DECIMAL = ("weight_kb", "train_time_s")
#: columns shown as written: bit widths (1.58, the ternary width, not 1.5800)
_AS_WRITTEN = ("w_bits", "a_bits")


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def table_rows(
    groups: list[Group], extras: list[str], metric: Metric = TEST_ACC
) -> tuple[list[str], list[list[Any]]]:
    """Header and raw rows (numbers unrounded) of the comparison table."""
    m = metric.key
    header = [
        "dataset", "model", "quantizer", "estimator", *extras, "w_bits", "a_bits", "runs",
        "seeds", f"{m}_mean", f"{m}_std", f"{m}_min", f"{m}_max", "weight_kb", "train_time_s",
    ]  # fmt: skip
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
                min(g.values),
                max(g.values),
                g.mean_of("weight_kb"),
                g.mean_of("train_time_s"),
            ]
        )
    return header, rows


def _display(
    header: list[str], rows: list[list[Any]], metric: Metric
) -> tuple[list[str], list[list[str]]]:
    std = f"{metric.key}_std"
    shown = [h.replace(std, f"{std}*") for h in header]
    digits = {h: 1 for h in _ONE_DECIMAL}
    out = []
    for row in rows:
        out.append(
            [
                str(v) if h in _AS_WRITTEN else _fmt(v, digits.get(h, metric.digits))
                for h, v in zip(header, row, strict=True)
            ]
        )
    return shown, out


def format_text(header: list[str], rows: list[list[Any]], metric: Metric = TEST_ACC) -> str:
    """Fixed-width table for the terminal."""
    shown, cells = _display(header, rows, metric)
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
    axis: Axis,
    metric: Metric = TEST_ACC,
) -> str:
    """The report as Markdown: table, std note, figure link, skipped runs."""
    shown, cells = _display(header, rows, metric)
    lines = [f"# {metric.name} against {axis.words}", ""]
    lines.append("| " + " | ".join(shown) + " |")
    lines.append("|" + "|".join("---" for _ in shown) + "|")
    for r in cells:
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in r) + " |")
    lines += ["", f"\\* {STD_NOTE}. {metric.note}", ""]
    if figure:
        lines += [f"![{metric.name.lower()} against {axis.words}]({figure})", ""]
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
