"""End-to-end runs of `qexp train` on the bundled digits set."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from conftest import FAST, hparams_backend, read_metrics, run_qexp
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from qexp.report.hparams import HPARAMS, METRICS
from qexp.train.faults import FAULT_ENV, KILLED_STATUS

METRIC_FIELDS = {
    "estimator", "quantizer", "model", "dataset", "w_bits", "a_bits", "seed", "epochs",
    "test_acc", "test_acc_latent", "best_val_acc", "train_time_s", "samples_per_s",
    "weight_kb", "layers", "status",
}


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory) -> Path:
    """One short default-model run at 4 bits, shared by the tests that only read it."""
    root = tmp_path_factory.mktemp("run")
    run_dir = root / "r"
    run_qexp("train", *FAST, "trainer.epochs=3", "trainer.histograms=true",
             f"hydra.run.dir={run_dir}", cwd=root)
    return run_dir


@pytest.mark.slow
def test_run_reports_honest_accuracy_well_above_chance(digits_run):
    m = read_metrics(digits_run)
    assert set(m) >= METRIC_FIELDS
    assert m["status"] == "completed"
    assert m["test_acc"] > 0.6  # 10 classes: chance is 0.1
    assert 0 <= m["test_acc_latent"] <= 1
    assert (m["w_bits"], m["a_bits"]) == (4, 4)
    body = [r for r in m["layers"] if r["role"] == "body"]
    assert body, "the small CNN has quantized body layers"
    for row in m["layers"]:
        assert row["ok"]
        assert 2 <= row["levels"]["weight"] <= 2 ** row["w_bits"]
        assert 1 <= row["levels"]["activation"] <= 2 ** row["a_bits"]
        assert {"name", "w_bits", "a_bits", "params", "levels"} <= set(row)
    edge = [r for r in m["layers"] if r["role"] != "body"]
    assert [r["w_bits"] for r in edge] == [8, 8]
    expected_kb = sum(r["params"] * r["w_bits"] for r in m["layers"]) / 8 / 1024
    assert m["weight_kb"] == pytest.approx(expected_kb, rel=1e-3)


@pytest.mark.slow
def test_run_dir_layout_and_tensorboard_tags(digits_run):
    assert (digits_run / ".hydra" / "config.yaml").is_file()
    assert (digits_run / "checkpoints" / "last.pt").is_file()
    ea = EventAccumulator(str(digits_run), size_guidance={"scalars": 0, "histograms": 0})
    ea.Reload()
    tags = ea.Tags()
    for tag in ("train/loss", "train/acc", "val/acc", "test/acc", "test/acc_latent", "train/lr"):
        assert tag in tags["scalars"], tag
    assert any(t.startswith("weights/") for t in tags["histograms"])
    test_acc = ea.Scalars("test/acc")[-1].value
    assert test_acc == pytest.approx(read_metrics(digits_run)["test_acc"], abs=1e-6)
    # hparams are written into the run's own dir, not a subfolder
    assert sorted(p.name for p in digits_run.iterdir() if p.is_dir()) == [".hydra", "checkpoints"]


def _group_order(tags: list[str]) -> list[str]:
    """Tag groups in the order TensorBoard's Time Series view lists them: tags sorted by its
    natural order ('/' and digits before letters, digit runs by value), group = first part."""

    def natural(tag: str) -> list[tuple[int, str | int]]:
        return [
            (0, "") if part == "/" else (1, int(part)) if part.isdigit() else (2, part)
            for part in re.findall(r"/|\d+|[^/\d]", tag)
        ]

    groups: list[str] = []
    for tag in sorted(tags, key=natural):
        if tag.split("/")[0] not in groups:
            groups.append(tag.split("/")[0])
    return groups


@pytest.mark.slow
def test_time_series_opens_on_test_train_val(digits_run):
    ea = EventAccumulator(str(digits_run), size_guidance={"scalars": 0, "histograms": 0})
    ea.Reload()
    tags = ea.Tags()
    cards = tags["scalars"] + tags["histograms"] + tags["images"]
    # TensorBoard opens the first two groups; per-layer bits of a uniform quantizer never
    # change, so they are no cards (only in the Text tab's layer table)
    assert _group_order(cards)[:3] == ["test", "train", "val"]
    assert not [t for t in cards if t.startswith(("width/", "bits/", "budget/"))]
    assert {"layers/text_summary", "run/text_summary"} <= set(tags["tensors"])


@pytest.mark.slow
def test_hparams_tab_lists_every_column(digits_run):
    m = read_metrics(digits_run)
    seen = hparams_backend(digits_run.parent)
    assert {h["name"] for h in seen["experiment"]["hparamInfos"]} == set(HPARAMS)
    assert [i["displayName"] for i in seen["experiment"]["metricInfos"]] == list(METRICS)
    (session,) = seen["sessions"].values()
    assert session["status"] == "STATUS_SUCCESS"
    assert {k: session["hparams"][k] for k in HPARAMS} == {k: m[k] for k in HPARAMS}
    values = {v["name"]["tag"]: v["value"] for v in session["metricValues"]}
    assert {k: values[t] for k, t in METRICS.items()} == pytest.approx({k: m[k] for k in METRICS})


@pytest.mark.slow
def test_checkpoints_load_weights_only(digits_run):
    state = torch.load(digits_run / "checkpoints" / "last.pt", weights_only=True)
    assert state["epoch"] == 3 and "optimizer" in state and "rng" in state


@pytest.mark.slow
def test_corrupt_checkpoint_gives_one_line(tmp_path):
    run_dir = tmp_path / "r"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "last.pt").write_bytes(b"not a checkpoint")
    proc = run_qexp("train", *FAST, "resume=true", f"hydra.run.dir={run_dir}", cwd=tmp_path,
                    check=False)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "corrupt" in proc.stderr and "last.pt" in proc.stderr


@pytest.mark.slow
def test_sweep_leaves_one_run_dir_per_job(tmp_path):
    sweep = tmp_path / "sweep"
    run_qexp("train", "-m", "estimator=ste,clipped_ste", "bits=1,4", *FAST, "trainer.epochs=1",
             f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    runs = sorted(p.parent for p in sweep.rglob("metrics.json"))
    assert len(runs) == 4
    seen = set()
    for run in runs:
        m = read_metrics(run)
        assert m["status"] == "completed"
        assert list(run.glob("events.out.tfevents.*"))
        seen.add((m["estimator"], m["w_bits"]))
    assert seen == {("ste", 1), ("ste", 4), ("clipped_ste", 1), ("clipped_ste", 4)}


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_result(tmp_path):
    args = [*FAST, "trainer.epochs=3", "trainer.batch_size=8", "trainer.lr=0.001"]
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "killed"
    run_qexp("train", *args, f"hydra.run.dir={ref_dir}", cwd=tmp_path)

    # dies like a SIGKILLed process at the end of epoch 1 (qexp/train/faults.py)
    killed = run_qexp("train", *args, f"hydra.run.dir={run_dir}", cwd=tmp_path, check=False,
                      env={FAULT_ENV: "kill@epoch:1"})  # fmt: skip
    assert killed.returncode == KILLED_STATUS
    state = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert state["epoch"] == 1, "the run must be killed during its second epoch"
    assert read_metrics(run_dir)["status"] == "running"

    run_qexp("train", *args, "resume=true", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    resumed, ref = read_metrics(run_dir), read_metrics(ref_dir)
    assert resumed["status"] == "completed"
    assert resumed["test_acc"] == ref["test_acc"]
    assert resumed["history"] == ref["history"]


@pytest.mark.slow
def test_resume_refuses_a_different_config(tmp_path, digits_run):
    proc = run_qexp("train", *FAST, "trainer.epochs=3", "bits=2", "resume=true",
                    f"hydra.run.dir={digits_run}", cwd=tmp_path, check=False)
    assert proc.returncode == 2
    assert "different config" in proc.stderr


@pytest.mark.slow
def test_user_config_dir_adds_a_group_option(tmp_path):
    user = tmp_path / "myconf" / "estimator"
    user.mkdir(parents=True)
    (user / "my_ste.yaml").write_text("_target_: qexp.estimators.ste.STE\nname: my_ste\n")
    run_dir = tmp_path / "r"
    run_qexp("train", "--config-dir", str(tmp_path / "myconf"), "estimator=my_ste", *FAST,
             "trainer.epochs=1", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert read_metrics(run_dir)["estimator"] == "my_ste"


@pytest.mark.slow
def test_nan_loss_stops_with_one_line(tmp_path):
    run_dir = tmp_path / "r"
    proc = run_qexp("train", *FAST, "trainer.epochs=2", "trainer.lr=1e30",
                    "trainer.optimizer=sgd", f"hydra.run.dir={run_dir}", cwd=tmp_path,
                    check=False)
    assert proc.returncode == 2
    err = proc.stderr.strip()
    assert len(err.splitlines()) == 1 and "NaN" in err and "trainer.lr" in err
    assert "Traceback" not in proc.stderr
    assert read_metrics(run_dir)["status"] == "failed"
