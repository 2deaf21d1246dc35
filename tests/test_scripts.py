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
