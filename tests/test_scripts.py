"""The measurement scripts under scripts/ still run and print what the README quotes from them
(smallest settings: these check that the scripts work, not what they measure)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str) -> str:
    proc = subprocess.run(
        [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


@pytest.mark.slow
def test_bench_prints_each_ratio_with_its_target():
    out = _run(
        "scripts/bench.py", "--models", "small_cnn", "--rounds", "1", "--steps", "1",
        "--no-compile", "--copy-floor", "--threads", "1",
    )  # fmt: skip
    for name in ("fp", "quant", "fp+copy"):
        assert re.search(rf"^\s+{re.escape(name)}\s+[\d.]+ ms/step", out, re.M), out
    assert re.search(r"quant / fp\s+[\d.]+ .*\(target <= 1\.10\)", out), out
    assert re.search(r"fp\+copy / fp\s+[\d.]+", out), out


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="reads /proc (Linux)")
def test_memory_floor_grows_stage_by_stage():
    out = _run("scripts/memory_floor.py")
    rss = {
        m.group(1).strip(): float(m.group(2))
        for m in re.finditer(r"^(python|import torch|\+ optimizer|\+ qexp)\s+(\d+)", out, re.M)
    }
    assert list(rss) == ["python", "import torch", "+ optimizer", "+ qexp"], out
    assert rss["python"] < rss["import torch"] <= rss["+ optimizer"] <= rss["+ qexp"]
    assert "largest resident mappings" in out


def test_headline_table_from_results_json(tmp_path):
    """Each cell: the mean and interval over seeds and the paired difference to the
    condition's baseline, bold only where Holm rejects; conditions picked by row:budget:opt."""
    import json

    cell = {"setting": "w1a1", "title": "W1/A1", "bits": 1, "status": "completed", "n": 10,
            "budget": 9, "optimizer": "sgd"}  # fmt: skip
    data = {
        "name": "s", "seeds": list(range(10)), "alpha": 0.05,
        "references": [{"setting": "w1a1", "seed": 0, "run_dir": "x", "test_acc": 0.871,
                        "model": {"activation": "hardtanh"}}],
        "cells": [{**cell, "method": "base", "mean": 0.80, "low": 0.79, "high": 0.81},
                  {**cell, "method": "new", "mean": 0.83, "low": 0.82, "high": 0.84},
                  {**cell, "method": "new", "budget": 3, "mean": 0.5, "low": 0.4, "high": 0.6}],
        "comparisons": [{"setting": "w1a1", "method": "new", "baseline": "base", "n": 10,
                         "diff": 0.03, "low": 0.02, "high": 0.04, "p": 0.001, "p_holm": 0.004,
                         "verdict": "better", "budget": 9, "optimizer": "sgd"}],
    }  # fmt: skip
    (tmp_path / "results.json").write_text(json.dumps(data))
    out = _run("scripts/headline_table.py", str(tmp_path), "w1a1:9:sgd").splitlines()
    assert out[0] == "| method | W1/A1<br>9 epochs, sgd |"
    assert out[2] == "| base | 80.0 [79.0, 81.0]<br>baseline |"
    assert out[3] == "| new | 83.0 [82.0, 84.0]<br>**+3.0 [+2.0, +4.0]** |"
    assert out[4] == "| full precision | 87.1 |"
