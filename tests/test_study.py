"""`qexp study` on digits: references trained once, tuning blind to the test set, failed
methods reported, killed studies resumed, the trainer seams it uses."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml
from conftest import FAST, compose_config, run_qexp

from qexp.data.sealed import SealedSplitError, SealedTest
from qexp.errors import QexpError
from qexp.report.compare import main as compare_main
from qexp.study.pipeline import Study, plateau_gain
from qexp.study.pipeline import main as study_main
from qexp.study.runs import hydra_configs, load_spec
from qexp.study.spec import parse_spec
from qexp.study.workers import InProcess, Runtime
from qexp.train.faults import FAULT_ENV, KILLED_STATUS
from qexp.train.run import build_run, run_spec
from qexp.train.trainer import Trainer

BASE = [*FAST, "model=mlp", "model.hidden=[32,32]", "trainer.log_every=1000"]


def spec_dict(**changes) -> dict:
    """A small study: W1/A1 BinaryNet form, clipped STE vs STE, plus LSQ, which cannot run at
    1 bit (signed weights need 2): every one of its trials fails."""
    spec = {
        "name": "test",
        "base": BASE,
        "reference": ["trainer.epochs=3", "trainer.patience=1"],
        "plateau": {"window": 1, "tolerance": 0.01},
        "seeds": [0, 1],
        "tuning": {"trials": 2, "seed": 0, "overrides": ["trainer.epochs=1"]},
        "final": ["trainer.epochs=1"],
        "settings": [
            {"key": "w1a1", "bits": 1, "overrides": ["quantizer=binary"],
             "baseline": "clipped_ste"},
        ],
        "methods": {
            "clipped_ste": {"overrides": ["estimator=clipped_ste"]},
            "ste": {"overrides": ["estimator=ste"]},
            "lsq": {"overrides": ["estimator=ste", "quantizer=lsq"]},
        },
        "claims": [{"method": "ste", "setting": "w1a1", "text": "a made-up claim",
                    "source": "test", "diff": 0.01}],
    }
    spec.update(changes)
    return spec


def write_spec(path: Path, **changes) -> Path:
    path.write_text(yaml.safe_dump(spec_dict(**changes)))
    return path


def every_file(folder: Path, skip: str | None = None) -> dict[str, tuple[int, int]]:
    """(mtime, size) of every file under ``folder`` (but those under its ``skip`` folder)."""
    return {str(p): (p.stat().st_mtime_ns, p.stat().st_size) for p in sorted(folder.rglob("*"))
            if p.is_file() and (skip is None or skip not in p.relative_to(folder).parts[:1])}


def mtimes(folder: Path) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in sorted(folder.rglob("metrics.json"))}


def test_sealed_data_refuses_the_test_split():
    cfg = compose_config(*BASE)
    with pytest.raises(SealedSplitError):
        import torch

        SealedTest(build_run(run_spec(cfg), Path("/nonexistent")).data).eval_batches(
            "test", 10, torch.device("cpu")
        )


@pytest.mark.slow
def test_epoch_hook_and_patience_stop_training(tmp_path):
    cfg = compose_config(*BASE, "bits=32", "trainer.epochs=40", "trainer.patience=2")
    metrics = Trainer(build_run(run_spec(cfg), tmp_path / "plateau")).fit()
    done, best = metrics["epochs_done"], metrics["best_epoch"]
    assert done < 40 and done - best == 2  # stopped two epochs after its best one
    vals = [h["val_acc"] for h in metrics["history"]]
    assert max(vals[best:]) <= vals[best - 1]

    cfg = compose_config(*BASE, "bits=32", "trainer.epochs=5")
    parts = build_run(run_spec(cfg), tmp_path / "hook")
    seen = []
    parts.on_epoch = lambda history: seen.append(len(history)) or len(history) == 2
    assert Trainer(parts).fit()["epochs_done"] == 2 and seen == [1, 2]


@pytest.mark.slow
def test_tuning_never_reads_the_test_set(tmp_path, monkeypatch):
    monkeypatch.setenv("QEXP_CACHE", str(tmp_path / "cache"))
    spec = parse_spec(spec_dict(methods={"ste": {"overrides": ["estimator=ste"]}},
                                settings=[{"key": "w2a2", "bits": 2, "baseline": "ste"}]))
    study = Study(spec, tmp_path / "study")
    from qexp.data.base import TensorDataModule

    reads: list[str] = []
    real = TensorDataModule.eval_batches

    def spy(self, split, *args, **kwargs):
        reads.append(split)
        return real(self, split, *args, **kwargs)

    # a trial left running by a killed study: closed and replaced, not counted
    import optuna

    from qexp.study.journal import storage_at
    from qexp.study.tune import JOURNAL
    from qexp.study.workers import InProcess, Runtime

    journal = study.dir / "tuning" / "w2a2" / "ste" / JOURNAL
    optuna.create_study(study_name="w2a2/ste", storage=storage_at(journal)).ask()
    pool = InProcess(Runtime())
    with hydra_configs():
        cells = study.my_cells()
        ref_configs = study.reference_configs(cells)
        tuners = study.tuners(cells, ref_configs)
        study.references(pool, ref_configs, study.needed_references(cells, tuners, {}))
        monkeypatch.setattr(TensorDataModule, "eval_batches", spy)
        tuned = study.tuning(pool, tuners)
    knobs, result = tuned[("w2a2", "ste")]
    assert [t["state"] for t in result.trials] == ["complete", "complete"]
    stored = optuna.load_study(study_name="w2a2/ste", storage=storage_at(journal)).trials
    assert [t.user_attrs.get("interrupted", False) for t in stored] == [True, False, False]
    assert "val" in reads and "test" not in reads
    for trial in result.trials:
        record = json.loads((study.dir / trial["run_dir"] / "metrics.json").read_text())
        assert record["status"] == "completed" and "test_acc" not in record


def run_in_process(spec: Path, study_dir: Path, capsys) -> str:
    """`qexp study SPEC --dir STUDY_DIR` in this process; returns its stdout."""
    capsys.readouterr()
    assert study_main([str(spec), "--dir", str(study_dir), "workers=1"]) == 0
    return capsys.readouterr().out


@pytest.mark.slow
def test_killed_study_resumes_and_references_are_trained_once(tmp_path, monkeypatch, capsys):
    spec = write_spec(tmp_path / "spec.yaml")
    env = {"QEXP_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    monkeypatch.setenv("QEXP_CACHE", env["QEXP_CACHE"])
    study_dir = tmp_path / "study"

    # killed right after stage 1, as its first tuning run starts (os._exit: nothing is
    # flushed or cleaned up)
    first = run_qexp("study", str(spec), "--dir", str(study_dir), "workers=1", cwd=tmp_path,
                     check=False, env={**env, FAULT_ENV: "kill@start/tuning"})
    assert first.returncode == KILLED_STATUS, first.stderr
    assert "2 full-precision networks (2 trained now" in first.stdout
    references = mtimes(tmp_path / "cache")
    assert len(references) == 2

    # a preview beside the (cut-off) study: trains nothing, writes nothing but its report,
    # and leaves the cut-off trial for the next real call to close
    before = every_file(study_dir), every_file(tmp_path / "cache")
    capsys.readouterr()
    assert study_main([str(spec), "--dir", str(study_dir), "--preview"]) == 0
    assert "none trained: a preview" in capsys.readouterr().out
    assert (every_file(study_dir, skip="preview"), every_file(tmp_path / "cache")) == before
    preview = (study_dir / "preview" / "report.md").read_text()
    assert "Preview of an unfinished study" in preview and "0 of 6 tuning trials told" in preview
    assert not (study_dir / "results.json").exists()

    second = run_in_process(spec, study_dir, capsys)
    assert "(0 trained now" in second
    assert "3 cells x 2 trials (6 run now" in second
    assert "4/4 final runs completed (4 run now" in second
    assert mtimes(tmp_path / "cache") == references  # nothing retrained

    results = json.loads((study_dir / "results.json").read_text())
    for ref in results["references"]:  # converged: the plateau rule on the run's own curve
        assert ref["run_dir"].startswith("$QEXP_CACHE/")  # portable: no machine paths
        ref_dir = Path(os.path.expandvars(ref["run_dir"]))
        history = json.loads((ref_dir / "metrics.json").read_text())["history"]
        vals = [h["val_acc"] for h in history]
        assert ref["plateau_gain"] == pytest.approx(vals[-1] - max(vals[:-1]))
        assert ref["converged"] == (vals[-1] - max(vals[:-1]) < 0.01)
    cells = {c["method"]: c for c in results["cells"]}
    assert cells["lsq"]["status"] == "failed" and "2 bits" in cells["lsq"]["error"]
    assert [t["state"] for t in cells["lsq"]["trials"]] == ["fail", "fail"]
    assert cells["ste"]["n"] == cells["clipped_ste"]["n"] == 2
    assert {r["run_dir"].split("/")[0] for r in results["runs"]} == {"final"}
    [comparison] = results["comparisons"]
    assert (comparison["method"], comparison["baseline"]) == ("ste", "clipped_ste")
    report = (study_dir / "report.md").read_text()
    assert "failed: " in report and "a made-up claim" in report
    # how long it took, on what: the killed call (stopped) and this one (finished)
    assert [p["finished"] for p in results["pieces"]] == [False, True]
    assert results["pieces"][1]["execution"]["workers"] == 1
    assert results["tuning_runs"] == 4  # 2 methods x 2 trials that ran (lsq's failed)
    assert "## How long it took, and on what" in report and "| all |" in report
    for name in ("cells.csv", "runs.csv", "accuracy_vs_bits.png"):
        assert (study_dir / name).stat().st_size > 0
    assert any((study_dir / "tensorboard" / "ste").iterdir())
    # every final run is an ordinary run dir that `qexp compare` reads
    assert compare_main([str(study_dir / "final")]) == 0
    assert "clipped_ste" in capsys.readouterr().out

    finals = mtimes(study_dir / "final")
    # a record whose reference reads otherwise now (as one retrained on another machine)
    stored = json.loads((study_dir / "references.json").read_text())
    key = sorted(stored)[0]
    stored[key]["test_acc"] = 0.5
    (study_dir / "references.json").write_text(json.dumps(stored))
    third = run_in_process(spec, study_dir, capsys)
    assert "(0 trained now" in third and "(0 run now" in third
    assert "4/4 final runs completed (0 run now" in third
    assert "1 retrained to other numbers than recorded" in third
    assert mtimes(study_dir / "final") == finals
    again = json.loads((study_dir / "results.json").read_text())["references"]
    assert [r["recorded_test_acc"] for r in again if "recorded_test_acc" in r] == [0.5]
    assert "Retrained on another machine" in (study_dir / "report.md").read_text()

    # a preview reads a final run recorded under another config as stale, not as done
    record_path = sorted((study_dir / "final").rglob("metrics.json"))[0]
    record = json.loads(record_path.read_text())
    record_path.write_text(json.dumps({**record, "config_hash": "another"}))
    assert study_main([str(spec), "--dir", str(study_dir), "--preview"]) == 0
    preview = json.loads((study_dir / "preview" / "results.json").read_text())
    assert sorted(r["status"] for r in preview["runs"]) == ["completed"] * 3 + ["stale"]
    assert "3 of 4 planned final runs done" in (study_dir / "preview" / "report.md").read_text()
    record_path.write_text(json.dumps(record))

    # a second study on the same references trains no full-precision network
    other = Study(load_spec(str(spec)), tmp_path / "other")
    other.dir.mkdir()
    with hydra_configs():
        configs = other.reference_configs(other.cells())
        other.references(InProcess(Runtime()), configs, set(configs))
    assert "(0 trained now" in capsys.readouterr().out
    assert mtimes(tmp_path / "cache") == references


def test_study_dir_refuses_another_spec(tmp_path, capsys):
    study_dir = tmp_path / "study"
    study_dir.mkdir()
    (study_dir / "study.json").write_text(json.dumps({"name": "other"}))
    spec = write_spec(tmp_path / "spec.yaml")
    assert study_main([str(spec), "--dir", str(study_dir)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("qexp: error:") and "another spec" in err
    assert [n for n in os.listdir(study_dir) if n != ".locks"] == ["study.json"]


def test_plateau_gain_and_its_spec():
    history = [{"val_acc": v} for v in (0.50, 0.80, 0.84, 0.83, 0.845, 0.846)]
    # best of the last 3 (0.846) against the best before them (0.84)
    assert plateau_gain(history, 3) == pytest.approx(0.006)
    assert plateau_gain(history, 1) == pytest.approx(0.846 - 0.845)
    assert plateau_gain(history[:5], 3) is None  # too short to tell
    assert load_spec_dict(plateau={"window": 2}).plateau.window == 2
    with pytest.raises(QexpError, match="plateau takes window and tolerance"):
        load_spec_dict(plateau={"epochs": 2})
    with pytest.raises(QexpError, match="plateau.window must be >= 1"):
        load_spec_dict(plateau={"window": 0})


def load_spec_dict(**changes):
    return parse_spec(spec_dict(**changes))


def test_study_dir_takes_new_notes_claims_and_controls_but_not_new_runs(tmp_path):
    """Keys that shape only the report may change after the runs; the rest binds the dir."""
    first = Study(parse_spec(spec_dict()), tmp_path / "study")
    first.dir.mkdir()
    first.check_dir()
    reworded = spec_dict(notes=["a note"], controls=[{"method": "ste", "against": "lsq"}],
                         alpha=0.01)  # fmt: skip
    Study(parse_spec(reworded), first.dir).check_dir()
    stored = json.loads((first.dir / "study.json").read_text())
    assert stored["notes"] == ["a note"] and stored["alpha"] == 0.01
    (change,) = json.loads((first.dir / "spec_changes.json").read_text())["changes"]
    assert change["keys"] == ["alpha", "controls", "notes"]
    assert change["final_runs_completed"] == 0 and change["tuning_runs_completed"] == 0
    with pytest.raises(QexpError, match="another spec"):
        Study(parse_spec(spec_dict(seeds=[0, 1, 2])), first.dir).check_dir()
    # a setting appended (its runs are new ones) is taken; an earlier one changed is not
    settings = spec_dict()["settings"]
    extra = {"key": "w2a2", "bits": 2, "baseline": "ste", "methods": ["ste"]}
    Study(parse_spec(spec_dict(settings=[*settings, extra])), first.dir).check_dir()
    assert len(json.loads((first.dir / "study.json").read_text())["settings"]) == 2
    changes = json.loads((first.dir / "spec_changes.json").read_text())["changes"]
    assert changes[-1]["keys"][-1] == "settings (1 appended)"
    changed = [{**settings[0], "overrides": ["quantizer=uniform"]}, extra]
    with pytest.raises(QexpError, match="another spec"):
        Study(parse_spec(spec_dict(settings=changed)), first.dir).check_dir()
