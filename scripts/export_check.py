"""Train six small digits runs, export each (with ONNX) and verify it: the README's export table.

    python scripts/export_check.py                   # runs into runs/export_check/
    python scripts/export_check.py --out /tmp/ec     # elsewhere

Prints one Markdown row per run: the run's hard-quantized test_acc, the exported file's
accuracy in qexp's integer verifier and in onnxruntime, identical predictions, largest logit
difference, and the file's bytes against weight_kb (the rest is scales, biases and metadata).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

BASE = ["dataset=digits", "trainer.threads=1", "trainer.progress=none"]
RUNS = {
    "uniform W4/A4": ["bits=4"],
    "uniform W2/A2": ["bits=2"],
    "binary W1/A1": ["quantizer=binary", "bits=1"],
    # starts at 4 bits; the weight budget makes the layers learn their own, lower bit widths
    "dq_u3 mixed": ["quantizer=dq_u3", "bits=4", "budget.weight_kb=20",
                    "quantizer.lambda_w=10", "trainer.epochs=15"],
    "lsq W4/A4": ["quantizer=lsq", "bits=4"],
    "quantnet W1/A1": ["estimator=quantnet", "bits=1"],
}  # fmt: skip


def qexp(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "qexp.cli", *args], check=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("runs/export_check"))
    out = p.parse_args().out
    rows = []
    for name, overrides in RUNS.items():
        run_dir = out / name.replace(" ", "_").replace("/", "")
        if not (run_dir / "metrics.json").is_file() or "completed" not in (
            json.loads((run_dir / "metrics.json").read_text()).get("status", "")
        ):
            qexp("train", *BASE, *overrides, f"hydra.run.dir={run_dir}")
        qexp("export", str(run_dir), "--onnx")
        subprocess.run([sys.executable, "-m", "qexp.cli", "verify", str(run_dir / "export")])
        m = json.loads((run_dir / "metrics.json").read_text())
        e = m["export"]
        bits = "/".join(str(r["w_bits"]) for r in m["layers"])
        rows.append(
            f"| {name} | {bits} | {m['test_acc']:.4f} | {m['test_acc_exported']:.4f} | "
            f"{e['onnx']['test_acc']:.4f} | {e['identical_predictions']:.1%} / "
            f"{e['onnx']['identical_predictions']:.1%} | {e['max_logit_diff']:.1e} | "
            f"{e['file_bytes']} | {m['weight_kb'] * 1024:.0f} | {e['overhead_bytes']} | "
            f"{m['bops'] / 1e6:.1f} |"
        )
    print(
        "| run | w_bits per layer | test_acc | exported | ONNX | identical (ours / ONNX) "
        "| max logit diff | file bytes | weight_kb x 1024 | overhead | MBOPs |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
