"""qexp export / qexp verify: the exported network computes what qexp's hard evaluation does."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FAST, compose_config, qexp_cmd

from qexp.errors import QexpError
from qexp.export.fileformat import encode_export, read_export
from qexp.export.pack import pack_codes, packed_size, unpack_codes

#: onnx and onnxruntime are the optional extra `export`: without them the ONNX checks skip
HAVE_ONNX = all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxruntime"))

#: small model, a few epochs: well above chance on digits in a few seconds
SMALL = [*FAST, "model.width=8", "trainer.epochs=3", "trainer.lr=0.01"]


def train_in_process(run_dir: Path, *overrides: str) -> dict:
    """Train a run into ``run_dir`` (with the .hydra/config.yaml `qexp export` reads)."""
    from omegaconf import OmegaConf

    from qexp.train.run import run_training

    cfg = compose_config(*SMALL, *overrides)
    (run_dir / ".hydra").mkdir(parents=True)
    OmegaConf.save(cfg, run_dir / ".hydra" / "config.yaml")
    return run_training(cfg, run_dir)


# -- bit packing -----------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 8, 11, 16])
@pytest.mark.parametrize("count", [1, 7, 8, 9, 100])
def test_pack_roundtrip_and_size(bits, count):
    rng = np.random.default_rng(bits * 1000 + count)
    codes = rng.integers(0, 2**bits, size=count)
    packed = pack_codes(codes, bits)
    assert packed.dtype == np.uint8 and packed.size == packed_size(count, bits)
    assert packed.size == -(-count * bits // 8)  # ceil: 1 bit puts 8 codes in a byte
    np.testing.assert_array_equal(unpack_codes(packed, bits, count), codes)


def test_pack_layout_is_lsb_first():
    # 2-bit codes 1, 2, 3, 0 -> bits 10 01 11 00 (LSB first) -> byte 0b00111001
    assert pack_codes(np.array([1, 2, 3, 0]), 2).tolist() == [0b00111001]
    with pytest.raises(ValueError):
        pack_codes(np.array([4]), 2)


# -- file integrity --------------------------------------------------------------------------
def _small_file(tmp_path: Path) -> Path:
    path = tmp_path / "model.safetensors"
    data = encode_export({"a.codes": np.arange(40, dtype=np.uint8)}, {"graph": {"nodes": []}})
    path.write_bytes(data)
    return path


def test_truncated_or_altered_file_is_refused(tmp_path):
    path = _small_file(tmp_path)
    tensors, meta = read_export(path)
    assert tensors["a.codes"].tolist() == list(range(40)) and meta["graph"] == {"nodes": []}
    data = path.read_bytes()
    path.write_bytes(data[:-5])
    with pytest.raises(QexpError, match="truncated"):
        read_export(path)
    altered = bytearray(data)
    altered[-1] ^= 0x01  # one weight bit
    path.write_bytes(bytes(altered))
    with pytest.raises(QexpError, match="altered"):
        read_export(path)


def test_cli_verify_truncated_file_one_line(tmp_path):
    path = _small_file(tmp_path)
    path.write_bytes(path.read_bytes()[:30])
    proc = subprocess.run(qexp_cmd("verify", str(path)), capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "truncated" in proc.stderr
    assert "Traceback" not in proc.stderr


# -- end to end ------------------------------------------------------------------------------
CASES = {
    "uniform_w2a2": ["bits=2"],
    "binary_w1a1": ["quantizer=binary", "bits=1"],
    "dq_u3": ["quantizer=dq_u3", "bits=4"],
    "lsq_w3a3": ["quantizer=lsq", "bits=3"],
    "quantnet_w1": ["estimator=quantnet", "bits=1"],
    "resnet20_w4a4": ["model=resnet20", "model.width=4", "bits=4"],
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_exported_network_matches_hard_evaluation(case, tmp_path):
    from qexp.export.verify import verify
    from qexp.export.write import export_run

    run_dir = tmp_path / "run"
    metrics = train_in_process(run_dir, *CASES[case])
    assert metrics["test_acc"] > 0.3  # trained, not a constant classifier
    summary = export_run(run_dir, onnx=HAVE_ONNX)
    # packed codes take the weight_kb the run reports: ceil(params * w_bits / 8) per layer
    rows = metrics["layers"]
    assert summary["packed_weight_bytes"] == sum(-(-r["params"] * r["w_bits"] // 8) for r in rows)
    assert abs(summary["packed_weight_bytes"] - metrics["weight_kb"] * 1024) < len(rows)
    # the trainer's cost report counts the same bytes, and BOPs = MACs x w_bits x a_bits
    cost = metrics["cost"]
    assert cost["total"]["weight_bytes"] == summary["packed_weight_bytes"]
    assert metrics["bops"] == sum(r["macs"] * r["w_bits"] * r["a_bits"] for r in cost["layers"])
    report = verify(run_dir / "export")
    assert report["test_acc_exported"] == pytest.approx(metrics["test_acc"], abs=1e-3)
    assert report["identical_predictions"] >= 0.999
    if HAVE_ONNX:
        assert report["onnx"]["identical_predictions"] >= 0.999
        assert report["onnx"]["test_acc"] == pytest.approx(metrics["test_acc"], abs=1e-3)
    assert report["passed"]
    stored = json.loads((run_dir / "metrics.json").read_text())
    assert stored["test_acc_exported"] == report["test_acc_exported"]
    assert (
        stored["export"]["file_bytes"] == (run_dir / "export" / "model.safetensors").stat().st_size
    )


@pytest.fixture(scope="module")
def binary_run(tmp_path_factory) -> Path:
    from qexp.export.write import export_run

    run_dir = tmp_path_factory.mktemp("export") / "run"
    train_in_process(run_dir, "quantizer=binary", "bits=1")
    export_run(run_dir)
    return run_dir


def _model_and_batch(run_dir: Path):
    from qexp.export.write import load_run

    _, data, model, _ = load_run(run_dir, "best")
    x, _ = next(iter(data.eval_batches("test", 200, torch.device("cpu"))))
    return model, x


def _hard_logits(model, x):
    from qexp.quant.layers import quant_mode

    with torch.no_grad(), quant_mode(model, "hard"):
        return model(x)


@pytest.mark.slow
def test_binary_body_layers_run_xnor_and_bits_are_mixed(binary_run):
    from qexp.export.engine import Engine

    tensors, meta = read_export(binary_run / "export" / "model.safetensors")
    engine = Engine(meta, tensors)
    kinds = {
        op.node["module"]: (op.node["weight"]["bits"], op.binary) for op in engine.quant.values()
    }
    # edge layers at their 8 bits on the integer path, body layers 1 bit by XNOR + popcount
    assert kinds == {
        "stem.0": (8, False),
        "stage1.0": (1, True),
        "stage2.0": (1, True),
        "stage2.4": (1, True),
        "fc": (8, False),
    }
    # 1-bit codes: 8 weights per byte
    w = meta["graph"]["nodes"][3]["weight"]
    assert tensors[w["codes"]].size == w["count"] // 8


@pytest.mark.slow
def test_batchnorm_kept_where_folding_through_max_pool_is_wrong(binary_run):
    from qexp.export.engine import Engine
    from qexp.export.graph import build_graph

    model, x = _model_and_batch(binary_run)
    bn = model.net.stem[2]  # conv - maxpool - BN: folds only with a positive scale
    with torch.no_grad():
        bn.weight[0] = -bn.weight[0].abs() - 0.5
    ref = _hard_logits(model, x)
    meta, tensors = build_graph(model.net, x)
    assert meta["batchnorm"]["kept"] == ["stem.2"] and "stage1.1" in meta["batchnorm"]["folded"]
    torch.testing.assert_close(Engine({"graph": meta}, tensors)(x), ref, atol=1e-4, rtol=0)
    meta, tensors = build_graph(model.net, x, fold_bn=False)
    assert meta["batchnorm"]["folded"] == [] and len(meta["batchnorm"]["kept"]) == 4
    torch.testing.assert_close(Engine({"graph": meta}, tensors)(x), ref, atol=1e-4, rtol=0)


@pytest.mark.slow
def test_verify_cli_needs_no_training_modules(binary_run):
    code = (
        "import sys; from qexp.cli import main; rc = main(['verify', sys.argv[1]]); "
        "bad = sorted(m for m in sys.modules if m.split('.')[:2] in "
        "(['qexp', 'quant'], ['qexp', 'estimators'], ['qexp', 'models'], ['qexp', 'train'])); "
        "print('IMPORTED', bad); sys.exit(rc)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(binary_run / "export")], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    assert "IMPORTED []" in proc.stdout and "PASSED" in proc.stdout


@pytest.mark.slow
def test_mixed_bit_widths_pack_per_layer(tmp_path):
    from qexp.export.engine import Engine
    from qexp.export.graph import build_graph

    run_dir = tmp_path / "run"
    train_in_process(run_dir, "quantizer=dq_u3", "bits=4")
    model, x = _model_and_batch(run_dir)
    layers = dict(model.layers())
    with torch.no_grad():  # U3 infers the bit width from q_max / d: 1 -> 2 bits, 3 -> 3 bits
        for name, ratio in (("stage1.0", 1.0), ("stage2.0", 3.0)):
            q = layers[name].w_quant
            q.d.fill_(float(q.q_max) / ratio)
    assert [layers[n].w_bits for n in ("stage1.0", "stage2.0", "stage2.4")] == [2, 3, 4]
    meta, tensors = build_graph(model.net, x)
    bits = {n["module"]: n["weight"]["bits"] for n in meta["nodes"] if "weight" in n}
    assert bits == {"stem.0": 8, "stage1.0": 2, "stage2.0": 3, "stage2.4": 4, "fc": 8}
    torch.testing.assert_close(
        Engine({"graph": meta}, tensors)(x), _hard_logits(model, x), atol=1e-4, rtol=0
    )


def test_unsupported_quantizer_is_a_one_line_error(tmp_path):
    from qexp.export.graph import build_graph
    from qexp.quant.calibrate import calibrate
    from qexp.train.build import build_data
    from qexp.train.run import build_model, run_spec

    cfg = compose_config(*SMALL, "quantizer=dq_pow2", "bits=3")
    data = build_data(cfg.dataset)
    model = build_model(run_spec(cfg), data.info, torch.device("cpu"), total_steps=1)
    x, _ = next(iter(data.eval_batches("test", 16, torch.device("cpu"))))
    calibrate(model, x)
    with pytest.raises(QexpError, match="export: layer stage1.0 uses DQPow2P3Quantizer"):
        build_graph(model.net, x)


def test_export_of_a_non_run_dir_is_a_one_line_error(tmp_path, capsys):
    from qexp.export.write import main

    assert main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a qexp run dir" in err
