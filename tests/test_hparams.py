"""A run's HParams record (qexp/report/hparams.py), read back through TensorBoard's own
HParams backend; no training."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import hparams_backend

from qexp.report.hparams import HPARAMS, METRICS, hparam_values, knobs, write_hparams


def _metrics(estimator: str, seed: int, acc: float) -> dict:
    return {
        "estimator": estimator,
        "quantizer": "uniform",
        "model": "mlp",
        "dataset": "digits",
        "w_bits": 2,
        "a_bits": 2,
        "seed": seed,
        "lr": 0.002,
        "epochs": 3,
        "status": "completed",
        "test_acc": acc,
        "best_val_acc": acc + 0.01,
        "test_acc_latent": acc + 0.02,
        "weight_kb": 4.5,
        "train_time_s": 1.5 + seed,
    }


def _write_run(run_dir: Path, metrics: dict, overrides: list[str], step: int = 40) -> None:
    from torch.utils.tensorboard import SummaryWriter

    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    writer = SummaryWriter(str(run_dir))
    # what the trainer logs itself
    writer.add_scalar("test/acc", metrics["test_acc"], step)
    writer.add_scalar("test/acc_latent", metrics["test_acc_latent"], step)
    write_hparams(writer, metrics, run_dir, step)
    writer.close()


def test_knobs_are_the_command_line_settings_beyond_the_columns(tmp_path):
    overrides = [
        "estimator=ste", "bits=2", "seed=1", "dataset=digits", "trainer.threads=1",
        "trainer.lr=0.1", "trainer.epochs=3", "+experiment=estimators_vs_bits",
        "budget.weight_kb=20.5", "+estimator.alpha_end=0.9",
        "trainer.momentum=0.8", "layers.first_bits=null", "tag=baseline",
    ]  # fmt: skip
    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    assert knobs(tmp_path) == {
        "budget.weight_kb": 20.5,
        "estimator.alpha_end": 0.9,
        "trainer.momentum": 0.8,
        "layers.first_bits": None,
        "tag": "baseline",
    }
    assert hparam_values({}, knobs(tmp_path))["layers.first_bits"] == "null"  # a setting too
    assert knobs(tmp_path / "no-such-run") == {}


def test_every_column_reaches_the_hparams_tab(tmp_path):
    runs = {
        "a": _metrics("ste", 0, 0.80),
        "b": _metrics("clipped_ste", 1, 0.85),
        "c": {**_metrics("ste", 1, 0.70), "status": "failed: levels exceed bit width"},
    }
    for name, metrics in runs.items():
        _write_run(tmp_path / name, metrics, [f"estimator={metrics['estimator']}", "bits=2",
                                              "budget.weight_kb=20"])  # fmt: skip
    seen = hparams_backend(tmp_path)
    infos = {h["name"]: h for h in seen["experiment"]["hparamInfos"]}
    knob = "budget.weight_kb"
    assert set(infos) == {*HPARAMS, knob}
    assert [m["displayName"] for m in seen["experiment"]["metricInfos"]] == list(METRICS)
    # TensorBoard shows the first five hparam columns, `differs` ones first, by name: the
    # ones telling a sweep's runs apart
    shown = sorted(infos.values(), key=lambda h: (not h.get("differs", False), h["name"]))[:5]
    assert {h["name"] for h in shown} == {"a_bits", "estimator", knob, "seed", "w_bits"}
    assert set(seen["sessions"]) == set(runs)
    for name, metrics in runs.items():
        session = seen["sessions"][name]
        for key in HPARAMS:
            assert session["hparams"][key] == metrics[key], (name, key)
        assert session["hparams"][knob] == 20
        values = {v["name"]["tag"]: v["value"] for v in session["metricValues"]}
        for key, tag in METRICS.items():
            assert values[tag] == pytest.approx(metrics[key], abs=1e-6), (name, key)
        ok = metrics["status"] == "completed"
        assert session["status"] == ("STATUS_SUCCESS" if ok else "STATUS_FAILURE")
