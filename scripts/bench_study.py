"""Wall time of a study with 1 worker against N workers, side by side in one run.

Runs the same study preset twice into fresh dirs and fresh caches (so each run trains its own
references): once with ``workers=1`` (in process) and once with ``workers=N`` (local worker
processes), both with ``threads=1`` per run, then prints the wall-time ratio and checks that
the final runs' test accuracies are identical (they must be: a run's numbers never depend on
the number of workers).

    python scripts/bench_study.py                       # digits_tiny, 1 vs 2 workers
    python scripts/bench_study.py --preset digits_tiny --workers 2 reference=[trainer.epochs=20]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run_study(preset: str, folder: Path, workers: int, overrides: list[str]) -> float:
    """Wall seconds of `qexp study PRESET --dir FOLDER/study workers=W` with its own cache."""
    env = {**os.environ, "QEXP_CACHE": str(folder / "cache"), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "qexp.cli", "study", preset, "--dir", str(folder / "study"),
           f"workers={workers}", "threads=1", *overrides]  # fmt: skip
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def final_accs(study_dir: Path) -> dict[str, float]:
    runs = json.loads((study_dir / "results.json").read_text())["runs"]
    return {f"{r['setting']}/{r['method']}/seed{r['seed']}": r["test_acc"] for r in runs}


def train_seconds(study_dir: Path, cache: Path) -> float:
    """Training time recorded by every run the study made (references, trials, finals)."""
    total = 0.0
    for folder in (study_dir, cache):
        for path in folder.rglob("metrics.json"):
            total += float(json.loads(path.read_text()).get("train_time_s") or 0.0)
    return total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="digits_tiny")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("overrides", nargs="*", help="spec overrides for both runs")
    args = parser.parse_args()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"{args.preset}, 1 vs {args.workers} workers, {os.cpu_count()} CPUs, load {load:.1f}")
    with tempfile.TemporaryDirectory() as tmp:
        one, many = Path(tmp) / "one", Path(tmp) / "many"
        t_one = run_study(args.preset, one, 1, args.overrides)
        t_many = run_study(args.preset, many, args.workers, args.overrides)
        a, b = final_accs(one / "study"), final_accs(many / "study")
        train_one = train_seconds(one / "study", one / "cache")
        train_many = train_seconds(many / "study", many / "cache")
    same = a == b
    print(f"  1 worker : {t_one:7.1f} s wall ({train_one:.1f} s of recorded training)")
    print(f"  {args.workers} workers: {t_many:7.1f} s wall "
          f"({train_many:.1f} s of recorded training)")
    print(f"  wall ratio {args.workers} / 1 workers: {t_many / t_one:.3f}")
    print(f"  final runs: {len(a)}, test accuracies identical: {same}")
    if not same:
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                print(f"    {key}: {a.get(key)} vs {b.get(key)}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
