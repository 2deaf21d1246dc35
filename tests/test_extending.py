"""A new estimator is one Python file plus one YAML: a toy estimator on PYTHONPATH and a YAML
in a --config-dir train with `qexp train` and take part in a study, no other file touched."""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path

import pytest
import yaml
from conftest import FAST, read_metrics, run_qexp

import qexp

TOY = textwrap.dedent(
    '''
    """A toy estimator: straight-through, with the weights' gradient scaled."""
    from qexp.estimators.base import Estimator
    from qexp.quant.base import ste


    class Toy(Estimator):
        def __init__(self, scale: float = 0.5) -> None:
            super().__init__()
            self.scale = float(scale)

        def weight(self, layer, w):
            hard = layer.w_quant.hard(w)
            scaled = w * self.scale + (w * (1 - self.scale)).detach()
            return ste(scaled, hard)
    '''
)


@pytest.fixture
def toy(tmp_path: Path) -> dict:
    """The toy estimator's file (its own folder, on PYTHONPATH) and YAML (a config dir)."""
    code, conf = tmp_path / "code", tmp_path / "conf"
    code.mkdir()
    (code / "toy_estimator.py").write_text(TOY)
    (conf / "estimator").mkdir(parents=True)
    (conf / "estimator" / "toy.yaml").write_text("_target_: toy_estimator.Toy\nscale: 0.5\n")
    path = os.pathsep.join(filter(None, [str(code), os.environ.get("PYTHONPATH")]))
    return {"conf": conf, "env": {"PYTHONPATH": path, "QEXP_CACHE": str(tmp_path / "cache"),
                                  "OMP_NUM_THREADS": "1"}}  # fmt: skip


@pytest.mark.slow
def test_a_toy_estimator_trains_and_takes_part_in_a_study(tmp_path, toy):
    package_conf = Path(qexp.__file__).resolve().parents[1] / "conf"
    before = sorted(p.name for p in (package_conf / "estimator").iterdir())
    run_dir = tmp_path / "run"
    run_qexp("train", "--config-dir", str(toy["conf"]), "estimator=toy", *FAST,
             "trainer.epochs=2", "bits=2", f"hydra.run.dir={run_dir}", cwd=tmp_path,
             env=toy["env"])  # fmt: skip
    metrics = read_metrics(run_dir)
    assert metrics["status"] == "completed" and metrics["estimator"] == "toy"
    assert metrics["test_acc"] > 0.2  # twice chance on digits

    preset = {
        "name": "toy_study",
        "base": [*FAST, "model=mlp", "model.hidden=[32]", "trainer.log_every=1000"],
        "reference": ["trainer.epochs=3"],
        "seeds": [0, 1],
        "tuning": {"trials": 1, "seed": 5, "overrides": ["trainer.epochs=1"]},
        "final": ["trainer.epochs=1"],
        "settings": [{"key": "w2a2", "title": "W2/A2", "bits": 2, "baseline": "ste"}],
        "methods": {"ste": {"overrides": ["estimator=ste"]},
                    "toy": {"overrides": ["estimator=toy"]}},
    }  # fmt: skip
    spec = tmp_path / "toy_study.yaml"
    spec.write_text(yaml.safe_dump(preset))
    out = run_qexp("study", str(spec), "--config-dir", str(toy["conf"]), "--dir",
                   str(tmp_path / "study"), "workers=1", cwd=tmp_path, env=toy["env"])  # fmt: skip
    assert "report in" in out.stdout
    results = json.loads((tmp_path / "study" / "results.json").read_text())
    toy_cell = next(c for c in results["cells"] if c["method"] == "toy")
    assert toy_cell["status"] == "completed" and toy_cell["n"] == 2
    assert "common knobs only" in (tmp_path / "study" / "report.md").read_text()
    # nothing of qexp's own was touched
    assert sorted(p.name for p in (package_conf / "estimator").iterdir()) == before
