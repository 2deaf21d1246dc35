"""Fixed-seed digits runs whose numbers a refactor must not change.

Trains every estimator at W1/A1, W2/A2 and W4/A4 and every other quantizer at one bit width on
the bundled digits set (2 epochs, seed 0, one thread), through ordinary `qexp train -m` sweeps,
and writes ``{run: test_acc}`` as JSON. Run it on two checkouts (e.g. before and after a change,
each with its own editable install) and compare the files:

    python scripts/regression_runs.py --out before.json       # on the old checkout
    python scripts/regression_runs.py --out after.json        # on the new one
    python scripts/regression_runs.py --diff before.json after.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

FAST = ["dataset=digits", "trainer.epochs=2", "trainer.threads=1", "trainer.progress=none",
        "trainer.histograms=false", "seed=0"]

#: (sweep name, overrides) of each sweep; every job of a sweep is one compared run
SWEEPS = [
    ("estimators", ["estimator=ste,clipped_ste,alpha_blend,aqe,quantnet,block_replace",
                    "bits=1,2,4"]),
    ("quantizers", ["quantizer=lsq,pact,dorefa,dq_u3", "bits=2"]),
    ("binary", ["quantizer=binary", "estimator=ste,clipped_ste", "bits=1"]),
    ("fp", ["bits=32"]),
]


def run_all(out: Path) -> dict[str, float]:
    """Train every sweep in a temp dir; return ``{sweep/run dir: test_acc}``."""
    results: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        env_cache = Path(tmp) / "cache"
        for name, overrides in SWEEPS:
            sweep_dir = Path(tmp) / name
            cmd = [sys.executable, "-m", "qexp.cli", "train", "-m", *FAST, *overrides,
                   f"hydra.sweep.dir={sweep_dir}"]
            print("+", " ".join(cmd[3:]), flush=True)
            subprocess.run(cmd, check=True, env={**os.environ, "QEXP_CACHE": str(env_cache)},
                           stdout=subprocess.DEVNULL)
            for metrics in sorted(sweep_dir.rglob("metrics.json")):
                data = json.loads(metrics.read_text())
                run = metrics.parent.relative_to(sweep_dir).as_posix()
                results[f"{name}/{run}"] = data.get("test_acc")
    out.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    return results


def diff(a: Path, b: Path) -> int:
    """Print the runs whose test_acc differs; exit status 1 when any does."""
    before, after = json.loads(a.read_text()), json.loads(b.read_text())
    keys = sorted(set(before) | set(after))
    changed = [k for k in keys if before.get(k) != after.get(k)]
    for k in keys:
        mark = "CHANGED" if k in changed else "same"
        print(f"{k:<40} {before.get(k)!s:>10} {after.get(k)!s:>10}  {mark}")
    print(f"{len(keys) - len(changed)}/{len(keys)} runs identical")
    return 1 if changed else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("regression_runs.json"))
    parser.add_argument("--diff", nargs=2, type=Path, metavar=("BEFORE", "AFTER"))
    args = parser.parse_args()
    if args.diff:
        return diff(*args.diff)
    results = run_all(args.out)
    print(f"{len(results)} runs -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
