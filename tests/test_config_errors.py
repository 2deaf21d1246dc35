"""Bad command lines fail before any work, with one line naming the key and what is allowed."""

import pytest
from conftest import run_qexp

from qexp.cli import main


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("bits=abc", ["bits='abc'", "1 to 16", "1.58"]),
        ("bits=0", ["bits=0", "1 to 16", "1.58", "32"]),
        ("bits=2.5", ["bits=2.5", "1 to 16", "1.58"]),
        ("w_bits=1.5", ["w_bits=1.5", "1.58 (ternary)"]),
        ("bits=4.0", ["bits=4.0", "1 to 16"]),
        ("w_bits=1.58", ["quantizer.weight", "signed_grid=narrow"]),
        ("quantizer=lsq w_bits=1.58", ["quantizer.weight", "quantizer=ternary", "quantizer=seq"]),
        ("quantizer=ternary bits=1.58", ["quantizer.activation", "a_bits=1.58", "a_bits=8"]),
        ("trainer.epochs=-1", ["trainer.epochs=-1", ">= 1"]),
        ("trainer.epoch=3", ["trainer.epoch", "not a config key", "trainer.epochs"]),
        ("foo=1", ["foo", "not a config key"]),
        ("estimator=nope", ["estimator=nope", "clipped_ste", "ste"]),
        ("model=nope", ["model=nope", "small_cnn"]),
        ("quantizer.weight.scale_method=bogus", ["scale_method", "mse"]),
        ("estimator=clipped_ste estimator.clip=abc", ["estimator.clip", "float"]),
        ("estimator=clipped_ste +estimator.typo=1", ["estimator.typo", "not an option", "clip"]),
        ("quantizer=binary bits=4", ["quantizer.weight", "1 bit"]),
        ("trainer.optimizer=lamb", ["trainer.optimizer", "sgd", "adamw"]),
        ("layers.first_bits=0", ["layers.first_bits", "null"]),
        ("quantizer=dq_pow2 estimator=aqe", ["estimator=aqe", "uniform grid", "estimator=ste"]),
        ("quantizer=dq_pow2 estimator=quantnet bits=2", ["estimator=quantnet", "uniform grid"]),
        ("quantizer=dq_u3 budget.weight_kb=1", ["budget.weight_kb", "smallest size"]),
    ],
)
def test_bad_override_fails_with_one_line(override, expected, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = main(["train", *override.split(), "dataset=digits"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1, err
    assert err.startswith("qexp: error:")
    for word in expected:
        assert word in err, (word, err)
    assert "Traceback" not in err
    assert not (tmp_path / "runs").exists(), "no run dir may be created for a bad config"


def test_sweep_points_are_all_checked(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = main(["train", "-m", "bits=1,4,0", "dataset=digits"])
    err = capsys.readouterr().err
    assert code == 2 and "bits=0" in err
    assert not (tmp_path / "multirun").exists()


@pytest.mark.slow
def test_cli_subprocess_prints_no_traceback(tmp_path):
    proc = run_qexp("train", "bits=0", cwd=tmp_path, check=False)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr + proc.stdout
    assert proc.stderr.strip().startswith("qexp: error: bits=0")


def test_unknown_command(capsys):
    assert main(["trian"]) == 2
    assert "unknown command" in capsys.readouterr().err


def test_missing_dataset_names_every_option(tmp_path, monkeypatch):
    import qexp.data.fashion_mnist as fm

    monkeypatch.setattr(fm, "DEBIAN_DIR", tmp_path / "none")
    monkeypatch.delenv("QEXP_DATA", raising=False)
    monkeypatch.setenv("QEXP_CACHE", str(tmp_path / "cache"))
    from qexp.errors import QexpError
    from qexp.train.build import instantiate

    with pytest.raises(QexpError) as info:
        spec = {"_target_": "qexp.data.fashion_mnist.FashionMNIST", "download": False}
        instantiate(spec, "dataset")
    msg = str(info.value)
    assert "dataset.root" in msg and "QEXP_DATA" in msg and "dataset-fashion-mnist" in msg
    assert "\n" not in msg


def test_preset_sweep_points_are_checked_before_any_job(capsys, tmp_path, monkeypatch):
    # The preset sweeps bits=1,2,4; the binary quantizer only has 1 bit, so the 2- and 4-bit
    # points must be refused before the sweep starts.
    monkeypatch.chdir(tmp_path)
    code = main(["train", "-m", "+experiment=estimators_vs_bits", "quantizer=binary",
                 "dataset=digits"])
    err = capsys.readouterr().err
    assert code == 2 and "quantizer.weight" in err and "1 bit" in err
    assert not (tmp_path / "multirun").exists()
