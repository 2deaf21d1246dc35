"""The README's headline table from a study's results.json: one column per condition, one row
per method; each cell the mean test accuracy with its 95% interval over seeds and, below it,
the paired difference to the condition's baseline (bold where Holm rejects), in points.

    python scripts/headline_table.py docs/study \\
        w1a1:9:adam w1a1:9:sgd w2a2:3:adam w4a4:3:adam

A column is ROW[:BUDGET[:OPTIMIZER]] (a setting's row, e.g. its group); its heading is the
setting's title with the budget and optimizer. The last line gives the full-precision mean of
each column's network form.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from qexp.study.figures import reference_forms
from qexp.study.results import StudyResults


def _cond(text: str) -> tuple[str, float | None, str | None]:
    parts = text.split(":")
    budget = float(parts[1]) if len(parts) > 1 and parts[1] else None
    return parts[0], budget, parts[2] if len(parts) > 2 else None


def _pts(x: float | None, signed: bool = False) -> str:
    if x is None:
        return "–"
    return f"{100 * x:+.1f}" if signed else f"{100 * x:.1f}"


def cell_text(results: StudyResults, cond: tuple, method: str) -> str:
    """"mean [low, high]<br>diff [low, high]" of one method in one condition."""
    cell = next((c for c in results.cells if c.condition == cond and c.method == method), None)
    if cell is None or not cell.n:
        return "–"
    top = f"{_pts(cell.mean)} [{_pts(cell.low)}, {_pts(cell.high)}]"
    comp = results.comparison(*cond[:1], method, cond[1], cond[2])
    if comp is None:
        return f"{top}<br>baseline"
    diff = f"{_pts(comp.diff, True)} [{_pts(comp.low, True)}, {_pts(comp.high, True)}]"
    rejected = comp.p_holm is not None and comp.p_holm < results.alpha
    return f"{top}<br>{f'**{diff}**' if rejected else diff}"


def table(results: StudyResults, columns: list[tuple]) -> str:
    """The markdown table of ``columns`` (conditions)."""
    titles = {c.condition: c.title for c in results.cells}
    heads = []
    for cond in columns:
        extra = ", ".join(x for x in (f"{cond[1]:g} epochs" if cond[1] else "", cond[2] or "") if x)
        heads.append(f"{titles.get(cond, cond[0])}" + (f"<br>{extra}" if extra else ""))
    methods = list(dict.fromkeys(c.method for c in results.cells if c.condition in columns))
    lines = [f"| method | {' | '.join(heads)} |", "|---|" + "---|" * len(columns)]
    for m in methods:
        lines.append(f"| {m} | {' | '.join(cell_text(results, c, m) for c in columns)} |")
    forms = reference_forms(results)
    fp = []
    for cond in columns:
        accs = next((a for _, settings, a in forms if cond[0] in settings), [])
        fp.append(_pts(sum(accs) / len(accs)) if accs else "–")
    lines.append(f"| full precision | {' | '.join(fp)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("study_dir", type=Path, help="a study's output dir (its results.json)")
    parser.add_argument("columns", nargs="+", help="ROW[:BUDGET[:OPTIMIZER]] per column")
    args = parser.parse_args(argv)
    data: dict[str, Any] = json.loads((args.study_dir / "results.json").read_text())
    print(table(StudyResults.from_json(data), [_cond(c) for c in args.columns]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
