"""A markdown table of any metric of a study's final runs: mean and SD over seeds per setting and
method, with the full-precision references of the same seeds as a first row.

The study report tabulates ``test_acc``; text runs also record ``test_bpc`` and ``test_loss``
in each run's metrics.json, and this table reads them from there:

    python scripts/study_table.py docs/study_transformer --metric test_bpc
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from qexp.train.partner import cache_root


def _fmt(values: list[float], digits: int) -> str:
    if not values:
        return "-"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} ± {sd:.{digits}f} (n={len(values)})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("study_dir", type=Path)
    parser.add_argument("--metric", default="test_acc")
    parser.add_argument("--digits", type=int, default=3)
    args = parser.parse_args()
    spec = json.loads((args.study_dir / "study.json").read_text())
    by_bits = sorted(spec["settings"], key=lambda s: float(s["bits"]))  # columns by width
    settings = [s["key"] for s in by_bits]
    methods = list(spec["methods"])
    cells: dict[tuple[str, str], list[float]] = {}
    for path in sorted((args.study_dir / "final").glob("*/*/seed*/metrics.json")):
        record = json.loads(path.read_text())
        if record.get("status") == "completed" and args.metric in record:
            key = (path.parts[-4], path.parts[-3])
            cells.setdefault(key, []).append(float(record[args.metric]))
    refs = []  # the evaluation seeds' references, from the run cache (references.json)
    stored = json.loads((args.study_dir / "references.json").read_text())
    for seed in spec["seeds"]:
        row = stored.get(f"{spec['settings'][0]['key']}/{seed}")
        path = Path(row["run_dir"].replace("$QEXP_CACHE", str(cache_root()))) if row else None
        if path is not None and (path / "metrics.json").exists():
            record = json.loads((path / "metrics.json").read_text())
            if args.metric in record:
                refs.append(float(record[args.metric]))
    print(f"| method | {' | '.join(settings)} |")
    print(f"|---|{'---|' * len(settings)}")
    print(f"| full precision | {' | '.join([_fmt(refs, args.digits)] * len(settings))} |")
    for m in methods:
        row = [_fmt(cells.get((s, m), []), args.digits) for s in settings]
        print(f"| {m} | {' | '.join(row)} |")


if __name__ == "__main__":
    main()
