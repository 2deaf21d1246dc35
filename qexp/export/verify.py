"""`qexp verify EXPORT`: evaluate an exported network on its run's test set, independently.

Nothing here imports qexp's training modules (qexp.quant, qexp.estimators, qexp.models,
qexp.train): the network runs from the file alone (qexp.export.engine: integer arithmetic,
XNOR + popcount for binary layers), the ONNX file runs in onnxruntime, and the test set is
rebuilt from the run config stored in the file. Both are compared with qexp's own hard
evaluation (``reference.safetensors``, written by ``qexp export``); the results go into the run's
``metrics.json`` when the export sits in ``RUN_DIR/export``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qexp.errors import QexpError
from qexp.export.engine import Engine
from qexp.export.fileformat import read_export
from qexp.record import METRICS_FILE, read_record, write_record
from qexp.rundir_lock import hold_run_dir

MODEL_FILE = "model.safetensors"
REFERENCE_FILE = "reference.safetensors"
ONNX_FILE = "model.onnx"
#: verification passes when the exported accuracy is this close to test_acc (fraction) ...
ACC_TOLERANCE = 0.001
#: ... and at least this share of predictions equals qexp's hard evaluation
MIN_IDENTICAL = 0.999


def rebuild_test_batches(config: dict[str, Any], batch_size: int):
    """The run's test set, rebuilt from its stored dataset config (qexp.data only).

    The dataset node is a flat ``_target_`` node (a data module's class and its options), so
    it is built here directly rather than through Hydra.
    """
    options = {k: v for k, v in config["dataset"].items() if k not in ("_target_", "name")}
    module_name, _, cls_name = str(config["dataset"]["_target_"]).rpartition(".")
    try:
        data = getattr(importlib.import_module(module_name), cls_name)(**options)
    except QexpError:
        raise
    except Exception as exc:
        raise QexpError(f"cannot rebuild the run's test set: {exc}") from None
    return data.eval_batches("test", batch_size, torch.device("cpu"))


def compare(logits: np.ndarray, ref: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Accuracy of ``logits`` and how it matches the reference logits."""
    pred, ref_pred = logits.argmax(1), ref.argmax(1)
    return {
        "test_acc": float((pred == labels).mean()),
        "identical_predictions": float((pred == ref_pred).mean()),
        "max_logit_diff": float(np.abs(logits - ref).max()),
    }


def run_onnx(path: Path, xs: list[np.ndarray]) -> np.ndarray:
    """Logits of the ONNX file in onnxruntime (CPU)."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise QexpError("onnxruntime is not installed: pip install 'qexp[export]'") from None
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    # the graph as written: no fusions that would change the arithmetic being checked
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as exc:
        msg = str(exc).strip().splitlines()[0][:150]
        raise QexpError(f"{path}: onnxruntime cannot load it ({msg}); re-export it") from None
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: x})[0] for x in xs])


def verify(export: Path, use_onnx: bool | None = None, store: bool = True) -> dict[str, Any]:
    """Evaluate the export at ``export`` (a dir or its model file); returns the results."""
    export = Path(export)
    model_path = export / MODEL_FILE if export.is_dir() else export
    out_dir = model_path.parent
    tensors, meta = read_export(model_path)
    ref_tensors, _ = read_export(out_dir / REFERENCE_FILE)
    ref, ref_labels = ref_tensors["logits"], ref_tensors["labels"]
    batch = int(meta["config"]["trainer"]["eval_batch_size"])
    engine = Engine(meta, tensors)
    xs, labels, outs = [], [], []
    for x, y in rebuild_test_batches(meta["config"], batch):
        xs.append(x.numpy())
        labels.append(y.numpy())
        outs.append(engine(x).numpy())
    labels_np = np.concatenate(labels)
    if labels_np.shape != ref_labels.shape or not np.array_equal(labels_np, ref_labels):
        raise QexpError(
            f"the test set rebuilt now differs from the one at export time ({out_dir}): "
            "check the dataset files, then re-export"
        )
    result = compare(np.concatenate(outs), ref, labels_np)
    run = meta["run"]
    weight_kb = run.get("weight_kb")
    report: dict[str, Any] = {
        "file": str(model_path),
        "file_bytes": model_path.stat().st_size,
        "packed_weight_bytes": meta["packed_weight_bytes"],
        "weight_kb": weight_kb,
        "overhead_bytes": (
            model_path.stat().st_size - round(weight_kb * 1024) if weight_kb is not None else None
        ),
        "batchnorm": meta["graph"]["batchnorm"],
        "checkpoint": run["checkpoint"],
        "reference_acc": float((ref.argmax(1) == labels_np).mean()),
        **{k: v for k, v in result.items() if k != "test_acc"},
    }
    report["test_acc_exported"] = result["test_acc"]
    onnx_path = out_dir / ONNX_FILE
    if use_onnx or (use_onnx is None and onnx_path.is_file()):
        if not onnx_path.is_file():
            raise QexpError(f"{onnx_path} does not exist: export with `qexp export --onnx`")
        report["onnx"] = {
            "file": str(onnx_path),
            "file_bytes": onnx_path.stat().st_size,
            **compare(run_onnx(onnx_path, xs), ref, labels_np),
        }
    # another checkpoint than the tested one: qexp's hard evaluation of it is the yardstick
    test_acc = run.get("test_acc")
    target = test_acc if test_acc is not None else report["reference_acc"]
    checks = [
        report["identical_predictions"] >= MIN_IDENTICAL,
        abs(result["test_acc"] - target) <= ACC_TOLERANCE + 1e-12,
    ]
    if "onnx" in report:
        checks.append(report["onnx"]["identical_predictions"] >= MIN_IDENTICAL)
    report["passed"] = all(checks)
    run_dir = out_dir.parent
    if store and (run_dir / METRICS_FILE).is_file():
        with hold_run_dir(run_dir):  # one writer per run dir: not while it still trains
            record = read_record(run_dir)
            if record is not None:
                record.data["test_acc_exported"] = result["test_acc"]
                record.data["export"] = report
                write_record(run_dir, record)
                report["stored_in"] = str(run_dir / METRICS_FILE)
    report["test_acc"] = test_acc
    return report


def main(argv: list[str]) -> int:
    """`qexp verify EXPORT [--onnx | --no-onnx] [--no-store]`; exit 1 when the check fails."""
    p = argparse.ArgumentParser(
        prog="qexp verify",
        description="Evaluate an exported network on its run's test set without qexp's "
        "training code, and compare it with qexp's hard evaluation.",
    )
    p.add_argument("export", type=Path, help="export dir (RUN_DIR/export) or its model file")
    onnx = p.add_mutually_exclusive_group()
    onnx.add_argument(
        "--onnx",
        dest="onnx",
        action="store_true",
        default=None,
        help="also check model.onnx (default: when it exists)",
    )
    onnx.add_argument("--no-onnx", dest="onnx", action="store_false")
    p.add_argument("--no-store", action="store_true", help="do not write into metrics.json")
    args = p.parse_args(argv)
    try:
        torch.set_num_threads(max(1, min(torch.get_num_threads(), 4)))
        r = verify(args.export, args.onnx, not args.no_store)
    except QexpError as exc:
        print(f"qexp: error: {exc}", file=sys.stderr)
        return 2
    if r["test_acc"] is not None:
        acc = f"run's test_acc {r['test_acc']:.4f}"
    else:
        acc = f"qexp's hard evaluation of {r['checkpoint']}: {r['reference_acc']:.4f}"
    print(
        f"exported: test_acc {r['test_acc_exported']:.4f} ({acc}), "
        f"identical predictions {r['identical_predictions']:.4%}, "
        f"max logit diff {r['max_logit_diff']:.3g}"
    )
    if "onnx" in r:
        o = r["onnx"]
        print(
            f"onnx:     test_acc {o['test_acc']:.4f}, identical predictions "
            f"{o['identical_predictions']:.4%}, max logit diff {o['max_logit_diff']:.3g}"
        )
    size = f"file {r['file_bytes']} bytes"
    if r["weight_kb"] is not None:
        size += f" = weight_kb {r['weight_kb']} ({r['weight_kb'] * 1024:.0f} bytes) + "
        size += f"{r['overhead_bytes']} bytes of scales, biases and metadata"
    print(size)
    if "stored_in" in r:
        print(f"stored in {r['stored_in']}")
    print("PASSED" if r["passed"] else "FAILED: the exported network differs from qexp's")
    return 0 if r["passed"] else 1
