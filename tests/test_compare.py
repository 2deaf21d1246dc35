"""`qexp compare` on hand-written run dirs (no training), and `qexp tb`."""

from __future__ import annotations

import csv
import json
import math
import queue
import re
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from qexp.report.compare import compare, main, pareto_front, plot_series
from qexp.report.runs import find_runs, group_runs

# (estimator, bits) -> test_acc of seeds 0, 1, 2
ACCS = {
    ("ste", 1): [0.50, 0.56, 0.47],
    ("ste", 2): [0.71, 0.70, 0.74],
    ("ste", 4): [0.88, 0.90, 0.89],
    ("clipped_ste", 1): [0.61, 0.58, 0.66],
    ("clipped_ste", 2): [0.80, 0.79, 0.81],
    ("clipped_ste", 4): [0.91],  # a single seed: std 0
}
FP32 = [0.95, 0.96]


def write_run(run_dir: Path, estimator: str, bits: int, seed: int, acc: float, **extra) -> None:
    run_dir.mkdir(parents=True)
    metrics = {
        "estimator": estimator,
        "quantizer": "uniform",
        "model": "mlp",
        "dataset": "digits",
        "w_bits": bits,
        "a_bits": bits,
        "seed": seed,
        "epochs": 1,
        "lr": 0.002,
        "config_hash": f"{estimator}{bits}{seed}",
        "status": "completed",
        "train_time_s": 1.0 + seed,
        "test_acc": acc,
        "weight_kb": 10.0 * bits,
    }
    metrics.update(extra)
    (run_dir / "metrics.json").write_text(json.dumps(metrics))


@pytest.fixture
def runs_dir(tmp_path: Path) -> Path:
    """A sweep dir, a nested single run (the fp32 reference) and a few broken runs."""
    top = tmp_path / "results"
    for (est, bits), accs in ACCS.items():
        for seed, acc in enumerate(accs):
            write_run(top / "sweep" / f"{est}-w{bits}-s{seed}", est, bits, seed, acc)
    for seed, acc in enumerate(FP32):
        write_run(top / "single" / "deep" / f"fp-{seed}", "ste", 32, seed, acc)
    broken = top / "sweep" / "broken"
    (broken / "no-metrics" / ".hydra").mkdir(parents=True)
    (broken / "bad-json").mkdir()
    (broken / "bad-json" / "metrics.json").write_text('{"status": "compl')
    write_run(broken / "running", "ste", 1, 7, 0.1, status="running")
    write_run(broken / "failed", "ste", 1, 8, 0.1, status="failed: RuntimeError: boom")
    return top


def test_find_runs_lists_broken_dirs(runs_dir):
    runs, skipped = find_runs([runs_dir])
    assert len(runs) == sum(map(len, ACCS.values())) + len(FP32)
    reasons = {s.path.name: s.reason for s in skipped}
    assert set(reasons) == {"no-metrics", "bad-json", "running", "failed"}
    assert "no metrics.json" in reasons["no-metrics"]
    assert "not valid JSON" in reasons["bad-json"]
    assert reasons["running"].startswith("status running")
    assert "boom" in reasons["failed"]


def test_means_and_sample_std(runs_dir, tmp_path):
    out = tmp_path / "out"
    result = compare([runs_dir], out)
    rows = list(csv.DictReader((out / "compare.csv").open()))
    assert len(rows) == len(ACCS) + 1  # + the fp32 reference
    for row in rows:
        bits = int(row["w_bits"])
        accs = FP32 if bits == 32 else ACCS[(row["estimator"], bits)]
        assert int(row["runs"]) == len(accs)
        assert float(row["test_acc_mean"]) == pytest.approx(statistics.fmean(accs))
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        assert float(row["test_acc_std"]) == pytest.approx(std)
        assert float(row["test_acc_min"]) == min(accs)
        assert float(row["weight_kb"]) == pytest.approx(10.0 * bits)
    md = (out / "compare.md").read_text()
    assert "ddof=1" in md and "accuracy_vs_bits.png" in md
    assert "skipped: 4 runs" in md
    assert (out / "accuracy_vs_bits.png").read_bytes()[:4] == b"\x89PNG"
    assert result["tensorboard"] == out / "tensorboard"


def _tb_runs(tb: Path) -> dict[str, object]:
    """Every TensorBoard run under ``tb`` (any folder holding event files), loaded."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    runs = {}
    for events in sorted(tb.rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events.parent), size_guidance={"scalars": 0})
        acc.Reload()
        runs[events.parent.relative_to(tb).as_posix()] = acc
    return runs


def test_tensorboard_summary(runs_dir, tmp_path):
    out = tmp_path / "out"
    compare([runs_dir], out)
    compare([runs_dir], out)  # a second report replaces the first, without doubled points
    runs = _tb_runs(out / "tensorboard")
    # one run per estimator plus the full-precision reference; no run without scalars
    assert set(runs) == {"ste", "clipped_ste", "full_precision"}
    for name, acc in runs.items():
        tags = acc.Tags()["scalars"]
        assert set(tags) == {f"compare/test_acc{s}" for s in ("", "_std", "_min", "_max")}, name
        for tag in tags:
            # steps only at the quantized bit widths (no 32 squeezing the axis)
            assert [e.step for e in acc.Scalars(tag)] == [1, 2, 4], (name, tag)
    for est in ("ste", "clipped_ste"):
        acc = runs[est]
        means = {e.step: e.value for e in acc.Scalars("compare/test_acc")}
        for bits in (1, 2, 4):
            assert means[bits] == pytest.approx(statistics.fmean(ACCS[(est, bits)]), abs=1e-6)
        maxes = {e.step: e.value for e in acc.Scalars("compare/test_acc_max")}
        assert maxes[1] == pytest.approx(max(ACCS[(est, 1)]), abs=1e-6)
        stds = {e.step: e.value for e in acc.Scalars("compare/test_acc_std")}
        assert stds[4] == pytest.approx(0.0 if est == "clipped_ste" else statistics.stdev(
            ACCS[(est, 4)]), abs=1e-6)  # fmt: skip
    # the reference: flat at the mean of the bits=32 runs, whatever their estimator
    fp = runs["full_precision"]
    assert [e.value for e in fp.Scalars("compare/test_acc")] == pytest.approx(
        [statistics.fmean(FP32)] * 3, abs=1e-6
    )
    assert [e.value for e in fp.Scalars("compare/test_acc_min")] == pytest.approx([min(FP32)] * 3)
    # the figure (first card: its tag sorts before the scalars) and the tables ride on it
    assert fp.Tags()["images"] == ["compare/accuracy_vs_bits"]
    texts = {t.split("/text_summary")[0]: t for t in fp.Tags()["tensors"]}
    assert set(texts) == {"compare/accuracy_vs_bits", "compare/table"}
    pivot = fp.Tensors(texts["compare/accuracy_vs_bits"])[0].tensor_proto.string_val[0].decode()
    ste_1 = ACCS[("ste", 1)]
    assert f"| ste | {statistics.fmean(ste_1):.4f} ± {statistics.stdev(ste_1):.4f} (3) |" in pivot
    assert f"| full precision | {statistics.fmean(FP32):.4f}" in pivot
    assert not any(acc.Tags()["images"] or acc.Tags()["tensors"] for n, acc in runs.items()
                   if n != "full_precision")  # fmt: skip


def test_tensorboard_without_full_precision_runs(runs_dir, tmp_path):
    for fp in (runs_dir / "single").rglob("metrics.json"):
        fp.unlink()
    out = tmp_path / "out"
    compare([runs_dir], out)
    runs = _tb_runs(out / "tensorboard")
    assert set(runs) == {"ste", "clipped_ste"}
    # the figure goes with the first line's run, still no run of its own
    assert runs["clipped_ste"].Tags()["images"] == ["compare/accuracy_vs_bits"]


def test_differing_settings_become_columns(tmp_path):
    top = tmp_path / "runs"
    for seed in (0, 1):
        write_run(top / f"a{seed}", "ste", 2, seed, 0.7 + seed / 100)
        write_run(top / f"b{seed}", "ste", 2, seed, 0.6 + seed / 100, lr=0.1)
        write_run(top / f"c{seed}", "ste", 2, seed, 0.5, quantizer="binary")
    runs, _ = find_runs([top])
    groups, extras = group_runs(runs)
    assert extras == ["trainer.lr"]
    assert len(groups) == 3 and all(g.n == 2 for g in groups)
    result = compare([top], tmp_path / "out")
    names = sorted(p.name for p in (tmp_path / "out" / "tensorboard").iterdir())
    # two quantizers: lines (and TensorBoard runs) are named quantizer/estimator
    assert "binary_ste__trainer.lr=0.002" in names
    assert "uniform_ste__trainer.lr=0.1" in names
    assert result["header"][4] == "trainer.lr"


def test_cli_output_and_errors(runs_dir, tmp_path, capsys):
    assert main([str(runs_dir), "--out", str(tmp_path / "o"), "--no-tensorboard"]) == 0
    out = capsys.readouterr().out
    assert "test_acc_std*" in out and "ddof=1" in out
    assert "skipped: 4 runs" in out
    assert not (tmp_path / "o" / "tensorboard").exists()
    assert main([str(tmp_path / "missing")]) == 2
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main([str(empty)]) == 1


# -- --x weight_kb: a weight-budget sweep ----------------------------------------------------
# budget (KB) -> (seed, test_acc, weight_kb learnt) of each run; every run has bits=8
BUDGET_RUNS = {
    16: [(0, 0.80, 15.9), (1, 0.82, 16.1)],
    18: [(0, 0.85, 17.6), (1, 0.84, 18.0), (2, 0.86, 17.9)],
    24: [(0, 0.90, 23.8)],  # a single seed: std 0
    20: [(0, 0.88, 19.7), (1, 0.87, 20.2)],
}


def write_budget_run(run_dir: Path, budget: int, seed: int, acc: float, kb: float) -> None:
    """A dq_u3 run whose metrics.json ends with its resolved config, as every run's does."""
    from qexp.record import config_fingerprint

    cfg = (
        {
            "seed": seed,
            "bits": 8,
            "dataset": {"name": "digits"},
            "model": {"name": "mlp"},
            "estimator": {"name": "ste"},
            "quantizer": {"name": "dq_u3", "weight_budget_kb": budget},
            "trainer": {"epochs": 1, "lr": 0.002},
        }
    )
    write_run(
        run_dir,
        "ste",
        8,
        seed,
        acc,
        quantizer="dq_u3",
        weight_kb=kb,
        config_hash=config_fingerprint(cfg),
        config=cfg,
    )


@pytest.fixture
def budget_dir(tmp_path: Path) -> Path:
    """A budget sweep, uniform 2- and 4-bit runs beside it, and a full-precision reference."""
    top = tmp_path / "budget"
    for budget, runs in BUDGET_RUNS.items():
        for seed, acc, kb in runs:
            write_budget_run(top / "sweep" / f"kb{budget}-s{seed}", budget, seed, acc, kb)
    for bits in (2, 4):
        for seed, acc in enumerate(ACCS[("ste", bits)]):
            write_run(top / "uniform" / f"w{bits}-s{seed}", "ste", bits, seed, acc)
    for seed, acc in enumerate(FP32):
        write_run(top / "fp" / f"s{seed}", "ste", 32, seed, acc)
    return top


def _expected_budget_points() -> tuple[list[float], list[float], list[float]]:
    """(mean weight_kb, mean test_acc, sample std) per budget, sorted by KB, from the runs."""
    pts = []
    for runs in BUDGET_RUNS.values():
        accs = [acc for _, acc, _ in runs]
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        pts.append((statistics.fmean(kb for *_, kb in runs), statistics.fmean(accs), std))
    pts.sort()
    return [p[0] for p in pts], [p[1] for p in pts], [p[2] for p in pts]


def test_plot_series_against_weight_kb(budget_dir):
    runs, skipped = find_runs([budget_dir])
    assert not skipped
    groups, extras = group_runs(runs)
    assert extras == ["quantizer.weight_budget_kb"]  # the budgets stay apart as groups
    lines = plot_series(groups, "weight_kb")
    assert list(lines) == [("digits", "mlp")]
    named = lines[("digits", "mlp")]
    # one line per quantizer + estimator, the budgets being its points; no fp32 point
    assert sorted(named) == ["dq_u3/ste", "uniform/ste"]
    xs, ys, yerrs = named["dq_u3/ste"]
    exp_x, exp_y, exp_err = _expected_budget_points()
    assert xs == pytest.approx(exp_x)
    assert ys == pytest.approx(exp_y)
    assert yerrs == pytest.approx(exp_err)
    assert xs == sorted(xs)
    # uniform runs: weight_kb = 10 * bits in the fake metrics
    xs, ys, yerrs = named["uniform/ste"]
    assert xs == pytest.approx([20.0, 40.0])
    assert ys == pytest.approx([statistics.fmean(ACCS[("ste", b)]) for b in (2, 4)])
    assert yerrs == pytest.approx([statistics.stdev(ACCS[("ste", b)]) for b in (2, 4)])
    # against bits the budgets are separate lines with one point each, all at x = 8
    by_bits = plot_series(groups, "bits")[("digits", "mlp")]
    dq_lines = [v for k, v in by_bits.items() if k.startswith("dq_u3/")]
    assert len(dq_lines) == len(BUDGET_RUNS) and all(v[0] == [8.0] for v in dq_lines)
    with pytest.raises(ValueError):
        plot_series(groups, "act_kb")


def test_plot_series_skips_runs_without_weight_kb(tmp_path):
    top = tmp_path / "runs"
    write_run(top / "a", "ste", 2, 0, 0.7)
    write_run(top / "b", "clipped_ste", 2, 0, 0.6, weight_kb=None)
    groups, _ = group_runs(find_runs([top])[0])
    assert list(plot_series(groups, "weight_kb")[("digits", "mlp")]) == ["ste"]
    result = compare([top], tmp_path / "out", tensorboard=False, x="weight_kb")
    assert [g.estimator for g in result["no_x_value"]] == ["clipped_ste"]


def test_compare_against_weight_kb(budget_dir, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "out"
    result = compare([budget_dir], out, x="weight_kb")
    assert result["figure"] == out / "accuracy_vs_weight_kb.png"
    assert result["figure"].read_bytes()[:4] == b"\x89PNG"
    assert not (out / "accuracy_vs_bits.png").exists()
    md = (out / "compare.md").read_text()
    assert "(accuracy_vs_weight_kb.png)" in md and "accuracy_vs_bits.png" not in md
    # the table is the same as with the default x
    rows = list(csv.DictReader((out / "compare.csv").open()))
    assert [r["quantizer.weight_budget_kb"] for r in rows if r["quantizer"] == "dq_u3"] == [
        str(b) for b in sorted(BUDGET_RUNS)
    ]
    assert result["rows"] == compare([budget_dir], tmp_path / "bits", tensorboard=False)["rows"]
    # TensorBoard: the figure's points at step = round(weight_kb)
    acc = EventAccumulator(str(out / "tensorboard" / "dq_u3_ste"))
    acc.Reload()
    means = {e.step: e.value for e in acc.Scalars("compare/test_acc_vs_kb")}
    exp_x, exp_y, _ = _expected_budget_points()
    assert sorted(means) == [round(x) for x in exp_x]
    for x, y in zip(exp_x, exp_y, strict=True):
        assert means[round(x)] == pytest.approx(y, abs=1e-6)
    runs = _tb_runs(out / "tensorboard")
    assert "figure" not in runs
    (with_figure,) = [n for n, a in runs.items() if a.Tags()["images"]]
    assert runs[with_figure].Tags()["images"] == ["compare/accuracy_vs_weight_kb"]


def test_cli_x_weight_kb(budget_dir, tmp_path, capsys):
    out = tmp_path / "o"
    args = [str(budget_dir), "--out", str(out), "--no-tensorboard"]
    assert main([*args, "--x", "weight_kb"]) == 0
    assert str(out / "accuracy_vs_weight_kb.png") in capsys.readouterr().out
    assert main(args) == 0  # default: against bits
    assert (out / "accuracy_vs_bits.png").is_file()
    assert "(accuracy_vs_bits.png)" in (out / "compare.md").read_text()
    with pytest.raises(SystemExit):
        main([*args, "--x", "act_kb"])


# -- qexp tb --------------------------------------------------------------------------------
def _read_lines(stream, lines: queue.Queue) -> None:
    for line in stream:
        lines.put(line)


def _drain(lines: queue.Queue) -> list[str]:
    """What the reader thread has queued so far."""
    out = []
    while not lines.empty():
        out.append(lines.get_nowait())
    return out


def test_tb_serves_on_localhost_only(tmp_path):
    # the only reason to skip: TensorBoard itself is missing; a `qexp tb` that crashes fails
    pytest.importorskip("tensorboard")
    proc = subprocess.Popen(
        [sys.executable, "-m", "qexp.cli", "tb", str(tmp_path)],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: queue.Queue = queue.Queue()
    reader = threading.Thread(target=_read_lines, args=(proc.stdout, lines), daemon=True)
    reader.start()
    try:
        url = None
        deadline = time.monotonic() + 60  # generous: the test machines are shared
        seen = []
        while url is None and time.monotonic() < deadline:
            try:
                line = lines.get(timeout=0.5)
            except queue.Empty:
                if proc.poll() is not None:
                    break
                continue
            seen.append(line)
            m = re.search(r"TensorBoard on (http://([\d.]+):(\d+)/)", line)
            if m:
                url, host, port = m.group(1), m.group(2), int(m.group(3))
        if url is None:
            if proc.poll() is not None:
                reader.join(timeout=5)  # the rest of a crashed process's output
            seen += _drain(lines)
            state = "still running" if proc.poll() is None else f"exit code {proc.returncode}"
            pytest.fail(f"qexp tb did not start TensorBoard ({state}):\n{''.join(seen)[-3000:]}")
        assert host == "127.0.0.1"
        with urllib.request.urlopen(url, timeout=10) as resp:
            assert resp.status == 200
        with socket.socket() as s, pytest.raises(OSError):
            s.bind(("127.0.0.1", port))  # TensorBoard holds the port
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_tb_links_the_unsmoothed_chart_of_a_compare_folder(runs_dir, tmp_path):
    from qexp.report.tb import addresses

    result = compare([runs_dir], tmp_path / "out")
    url = "http://127.0.0.1:6006/"
    assert addresses(result["tensorboard"], url)[1] == (
        f"the compare charts, unsmoothed: {url}#scalars&_smoothingWeight=0"
    )
    assert len(addresses(runs_dir, url)) == 1  # a run or sweep dir: just the address


# -- the metric: whichever the runs' task reports ---------------------------------------------
# bits -> test_bpc of seeds 0, 1 (a character model: lower is better)
BPC = {2: [1.90, 1.96], 4: [1.52, 1.50], 8: [1.51, 1.53]}


def write_lm_runs(top: Path) -> None:
    """Language-model runs: test_bpc (and test_loss) but no test_acc."""
    for bits, values in BPC.items():
        for seed, bpc in enumerate(values):
            write_run(top / f"lm-w{bits}-s{seed}", "ste", bits, seed, None, model="char_lm",
                      test_bpc=bpc, test_loss=bpc * math.log(2), bops=1000.0 * bits)  # fmt: skip


def test_compare_plots_the_metric_the_runs_report(tmp_path):
    top = tmp_path / "lm"
    write_lm_runs(top)
    out = tmp_path / "out"
    result = compare([top], out)
    assert result["metric"].key == "test_bpc"  # no run reports test_acc
    rows = list(csv.DictReader((out / "compare.csv").open()))
    assert "test_acc_mean" not in rows[0]
    for row in rows:
        values = BPC[int(row["w_bits"])]
        assert float(row["test_bpc_mean"]) == pytest.approx(statistics.fmean(values))
        assert float(row["test_bpc_std"]) == pytest.approx(statistics.stdev(values))
        assert float(row["test_bpc_max"]) == max(values)
    md = (out / "compare.md").read_text()
    assert md.startswith("# BPC against bit width") and "(bpc_vs_bits.png)" in md
    assert "test_bpc_std*" in md and "lower is better" in md
    assert (out / "bpc_vs_bits.png").read_bytes()[:4] == b"\x89PNG"
    runs = _tb_runs(out / "tensorboard")
    means = {e.step: e.value for e in runs["ste"].Scalars("compare/test_bpc")}
    assert means == pytest.approx({b: statistics.fmean(v) for b, v in BPC.items()})
    assert runs["ste"].Tags()["images"] == ["compare/bpc_vs_bits"]
    # asked for explicitly: the loss
    result = compare([top], tmp_path / "loss", tensorboard=False, metric_key="test_loss")
    assert result["header"][8] == "test_loss_mean"
    assert result["rows"][0][8] == pytest.approx(statistics.fmean(BPC[2]) * math.log(2))


def test_pareto_front_of_a_lower_is_better_metric(tmp_path):
    top = tmp_path / "lm"
    write_lm_runs(top)
    groups, _ = group_runs(find_runs([top], ("test_bpc",))[0], "test_bpc")
    xs, ys, _ = plot_series(groups, "bops")[("digits", "char_lm")]["ste"]
    # 8 bits costs more than 4 and has a higher (worse) bpc: off the front; by hand
    assert xs == [2000.0, 4000.0, 8000.0]
    assert pareto_front(list(zip(xs, ys, strict=True)), higher_is_better=False) == [0, 1]
    # read as higher-is-better the same points give another front: the direction matters
    assert pareto_front(list(zip(xs, ys, strict=True))) == [0]


def test_mixed_runs_default_to_accuracy_and_skip_the_others(runs_dir, tmp_path, capsys):
    write_lm_runs(runs_dir / "lm")
    out = tmp_path / "out"
    assert main([str(runs_dir), "--out", str(out), "--no-tensorboard"]) == 0
    printed = capsys.readouterr().out
    assert "test_acc_mean" in printed
    assert "metrics.json has no test_acc" in (out / "compare.md").read_text()
    assert main([str(runs_dir), "--out", str(out), "--metric", "test_bpc",
                 "--no-tensorboard"]) == 0  # fmt: skip
    rows = list(csv.DictReader((out / "compare.csv").open()))
    assert {r["model"] for r in rows} == {"char_lm"}
    with pytest.raises(SystemExit):
        main([str(runs_dir), "--metric", "test_f1"])
