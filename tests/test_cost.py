"""Cost report (MACs, BOPs, packed bytes, activation bytes) and `qexp compare --x bops`."""

from __future__ import annotations

import itertools
import json
import math
import random
from pathlib import Path

import pytest
import torch
from torch import nn

from qexp.quant.cost import cost_metrics, cost_report
from qexp.quant.uniform import UniformQuantizer
from qexp.quant.wrap import LayerBits, quantize_model
from qexp.report.compare import compare, pareto_front, plot_series


def _net() -> nn.Module:
    """conv(1->4, 3x3, pad 1, stride 2) on 8x8 -> 4x4; grouped conv(4->6, groups 2); linear."""
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, stride=2, padding=1, bias=False),
        nn.ReLU(),
        nn.Conv2d(4, 6, 3, padding=1, groups=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(6 * 16, 10),
    )


def test_cost_report_against_closed_form():
    net = _net()
    make = lambda role, bits: UniformQuantizer(bits, role)  # noqa: E731
    quantize_model(net, make, make, LayerBits(2, 3), first_bits=8, last_bits=4)
    report = cost_report(net, torch.randn(5, 1, 8, 8))
    # (output values per sample) x (input channels per group) x kernel, by hand
    macs = [4 * 4 * 4 * (1 * 9), 6 * 4 * 4 * (2 * 9), 10 * 96]
    bits = [(8, 8), (2, 3), (4, 4)]
    params = [4 * 9, 6 * 2 * 9, 10 * 96]
    inputs = [64, 4 * 16, 96]
    rows = report["layers"]
    assert [r["name"] for r in rows] == ["0", "2", "5"]
    for r, m, (wb, ab), p, a in zip(rows, macs, bits, params, inputs, strict=True):
        assert (r["macs"], r["w_bits"], r["a_bits"]) == (m, wb, ab)
        assert r["bops"] == m * wb * ab
        assert r["weight_bytes"] == math.ceil(p * wb / 8)
        assert r["act_bytes"] == math.ceil(a * ab / 8)
    total = report["total"]
    assert total["macs"] == sum(macs) and total["bops"] == sum(r["bops"] for r in rows)
    assert total["act_bytes_max"] == max(r["act_bytes"] for r in rows)
    assert total["act_bytes_sum"] == sum(r["act_bytes"] for r in rows)
    metrics = cost_metrics(net, torch.randn(2, 1, 8, 8))
    assert metrics["bops"] == total["bops"] and metrics["macs"] == total["macs"]


def test_full_precision_layers_count_32_bits():
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    quantize_model(net, lambda r, b: None, lambda r, b: None, LayerBits(32, 32), None, None)
    row = cost_report(net, torch.randn(1, 1, 8, 8))["layers"][0]
    assert (row["macs"], row["bops"], row["weight_bytes"]) == (640, 640 * 32 * 32, 640 * 4)


@pytest.mark.parametrize("seed", range(5))
def test_pareto_front_against_brute_force(seed):
    rng = random.Random(seed)
    # few distinct values, so ties on cost and on accuracy occur
    pts = [(float(rng.randint(1, 6)), rng.randint(0, 5) / 5) for _ in range(12)]

    def dominated(i):
        return any(
            pts[j][0] <= pts[i][0] and pts[j][1] >= pts[i][1] and pts[j] != pts[i]
            for j in range(len(pts))
        )

    expected = {i for i in range(len(pts)) if not dominated(i)}
    front = pareto_front(pts)
    assert set(front) == expected
    assert [pts[i][0] for i in front] == sorted(pts[i][0] for i in front)
    # along the front, more cost buys strictly more accuracy
    for a, b in itertools.pairwise(front):
        assert pts[a][0] == pts[b][0] or pts[a][1] < pts[b][1]


def _write_run(run_dir: Path, bits: int, seed: int, acc: float, bops: float | None) -> None:
    run_dir.mkdir(parents=True)
    metrics = {
        "estimator": "ste", "quantizer": "uniform", "model": "mlp", "dataset": "digits",
        "w_bits": bits, "a_bits": bits, "seed": seed, "epochs": 1, "lr": 0.002,
        "config_hash": f"{bits}{seed}", "status": "completed", "test_acc": acc,
        "weight_kb": 10.0 * bits,
    }  # fmt: skip
    if bops is not None:
        metrics["bops"] = bops
    (run_dir / "metrics.json").write_text(json.dumps(metrics))


def test_compare_against_bops(tmp_path, capsys):
    from qexp.report.compare import main
    from qexp.report.runs import find_runs, group_runs

    top = tmp_path / "runs"
    # bits -> accuracies over two seeds; bops = 1000 * bits^2
    accs = {2: [0.70, 0.72], 4: [0.90, 0.92], 8: [0.89, 0.91]}
    for bits, pair in accs.items():
        for seed, acc in enumerate(pair):
            _write_run(top / f"w{bits}-{seed}", bits, seed, acc, 1000.0 * bits**2)
    _write_run(top / "old", 3, 0, 0.8, None)  # a run from before the cost report
    groups, _ = group_runs(find_runs([top])[0])
    xs, ys, _ = plot_series(groups, "bops")[("digits", "mlp")]["ste"]
    assert xs == [4000.0, 16000.0, 64000.0]
    assert ys == pytest.approx([0.71, 0.91, 0.90])
    # 8 bits costs more and is no more accurate than 4 bits: off the front
    assert pareto_front(list(zip(xs, ys, strict=True))) == [0, 1]
    out = tmp_path / "out"
    result = compare([top], out, tensorboard=False, x="bops")
    assert result["figure"] == out / "accuracy_vs_bops.png" and result["figure"].stat().st_size
    assert [g.w_bits for g in result["no_x_value"]] == [3]
    assert main([str(top), "--out", str(out), "--x", "bops", "--no-tensorboard"]) == 0
    assert "1 groups have no bops" in capsys.readouterr().out
