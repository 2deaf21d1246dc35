"""`qexp export RUN_DIR`: write a finished run's deployed network as a packed, code-free file.

Output (default ``RUN_DIR/export/``):

- ``model.safetensors``: bit-packed weight codes, per-channel scales, biases / folded BatchNorm,
  and JSON metadata (op graph, activation quantizers, the run's config);
- ``reference.safetensors``: qexp's own hard-evaluation logits on the run's test set, the
  yardstick ``qexp verify`` compares the exported network against;
- ``model.onnx`` with ``--onnx``: QuantizeLinear / DequantizeLinear around every Conv / Gemm.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from qexp.errors import QexpError
from qexp.export.fileformat import encode_export
from qexp.record import METRICS_FILE, read_json
from qexp.rundir_lock import hold_run_dir

MODEL_FILE = "model.safetensors"
REFERENCE_FILE = "reference.safetensors"
ONNX_FILE = "model.onnx"


def _atomic_write(path: Path, data: bytes) -> None:
    from qexp.record import atomic_write

    atomic_write(path, lambda f: f.write(data))


def load_run(run_dir: Path, checkpoint: str) -> tuple[Any, Any, Any, dict[str, Any]]:
    """(run spec, data, quantized model with the checkpoint loaded, checkpoint facts).

    The model is built for evaluation only: an estimator's training partner is not needed
    (and never trained) to export.
    """
    from qexp.train.build import build_data
    from qexp.train.checkpoint import checkpoint_file, load_checkpoint
    from qexp.train.run import build_model, load_run_spec

    spec = load_run_spec(run_dir)
    if checkpoint in ("best", "last"):
        path = run_dir / "checkpoints" / f"{checkpoint}.pt"
        if checkpoint == "best" and not path.is_file():
            path = checkpoint_file(run_dir, "RUN_DIR")  # runs without a best epoch: last.pt
    else:
        path = Path(checkpoint)
    state = load_checkpoint(path)
    data = build_data(spec.dataset)
    device = torch.device("cpu")
    model = build_model(spec, data.info, device, total_steps=1, run_dir=run_dir)
    model.load_state_dict(state["model"])
    model.eval()
    return spec, data, model, {"checkpoint": str(path), "epoch": state.get("epoch")}


def _tested(run_dir: Path, checkpoint: str) -> bool:
    """Whether ``checkpoint`` is the one the trainer's final test evaluated."""
    best, last = run_dir / "checkpoints" / "best.pt", run_dir / "checkpoints" / "last.pt"
    tested = best if best.is_file() else last
    return Path(checkpoint).resolve() == tested.resolve()


@torch.no_grad()
def reference_logits(model: torch.nn.Module, data: Any, batch_size: int) -> tuple[Tensor, Tensor]:
    """qexp's hard evaluation of the test set: (logits, labels)."""
    from qexp.quant.layers import quant_mode

    outs, labels = [], []
    with quant_mode(model, "hard"):
        for x, y in data.eval_batches("test", batch_size, torch.device("cpu")):
            outs.append(model(x).float())
            labels.append(y)
    return torch.cat(outs), torch.cat(labels)


def export_run(
    run_dir: Path,
    out_dir: Path | None = None,
    checkpoint: str = "best",
    fold_bn: bool = True,
    onnx: bool = False,
) -> dict[str, Any]:
    """Export ``run_dir``'s network; returns a summary (paths, sizes, BatchNorm handling)."""
    from qexp.export.graph import build_graph

    run_dir = Path(run_dir)
    out_dir = Path(out_dir) if out_dir is not None else run_dir / "export"
    spec, data, model, ckpt = load_run(run_dir, checkpoint)
    batch_size = int(spec.trainer.eval_batch_size)
    x, _ = next(iter(data.eval_batches("test", 256, torch.device("cpu"))))
    graph, tensors = build_graph(model.net, x, fold_bn=fold_bn)
    packed_bytes = sum(
        int(tensors[n["weight"]["codes"]].size)
        for n in graph["nodes"]
        if "codes" in n.get("weight", {})
    )
    metrics = read_json(run_dir / METRICS_FILE) or {}
    plain = spec.config
    info = data.info
    meta = {
        "graph": graph,
        "input_shape": [int(info.in_channels), int(info.image_size), int(info.image_size)],
        "num_classes": int(info.num_classes),
        "config": plain,
        "run": {
            "checkpoint": Path(ckpt["checkpoint"]).name,
            "epoch": ckpt["epoch"],
            # the run's test_acc belongs to the checkpoint the trainer tested (best, else last)
            "test_acc": metrics.get("test_acc") if _tested(run_dir, ckpt["checkpoint"]) else None,
            "weight_kb": metrics.get("weight_kb"),
        },
        "packed_weight_bytes": packed_bytes,
    }
    model_bytes = encode_export(tensors, meta)
    logits, labels = reference_logits(model, data, batch_size)
    ref_bytes = encode_export(
        {"logits": logits.numpy(), "labels": labels.numpy().astype(np.int64)},
        {"what": "qexp hard-evaluation logits of the test set", "checkpoint": meta["run"]},
    )
    # one writer per run dir: refuses a run that is still training
    lock = hold_run_dir(run_dir) if out_dir.resolve().is_relative_to(run_dir.resolve()) else None
    with lock or contextlib.nullcontext():
        _atomic_write(out_dir / MODEL_FILE, model_bytes)
        _atomic_write(out_dir / REFERENCE_FILE, ref_bytes)
    summary: dict[str, Any] = {
        "file": str(out_dir / MODEL_FILE),
        "file_bytes": len(model_bytes),
        "packed_weight_bytes": packed_bytes,
        "weight_kb": metrics.get("weight_kb"),
        "batchnorm": graph["batchnorm"],
        "reference_acc": float((logits.argmax(1) == labels).float().mean()),
    }
    if onnx:
        from qexp.export.onnx import onnx_bytes

        data_onnx = onnx_bytes(meta, tensors)
        _atomic_write(out_dir / ONNX_FILE, data_onnx)
        summary["onnx"] = str(out_dir / ONNX_FILE)
    return summary


def main(argv: list[str]) -> int:
    """`qexp export RUN_DIR [--checkpoint best|last|FILE] [--out DIR] [--keep-bn] [--onnx]`."""
    p = argparse.ArgumentParser(
        prog="qexp export", description="Write a run's deployed network as a bit-packed file."
    )
    p.add_argument("run_dir", type=Path, help="a finished run dir")
    p.add_argument("--checkpoint", default="best", help="best (default), last, or a .pt file")
    p.add_argument("--out", type=Path, default=None, help="output dir (default RUN_DIR/export)")
    p.add_argument("--keep-bn", action="store_true", help="keep BatchNorm ops instead of folding")
    p.add_argument("--onnx", action="store_true", help="also write model.onnx (QDQ)")
    args = p.parse_args(argv)
    try:
        s = export_run(args.run_dir, args.out, args.checkpoint, not args.keep_bn, args.onnx)
    except QexpError as exc:
        print(f"qexp: error: {exc}", file=sys.stderr)
        return 2
    bn = s["batchnorm"]
    print(
        f"wrote {s['file']}: {s['file_bytes']} bytes, of which {s['packed_weight_bytes']} "
        "packed weight codes"
    )
    if s["weight_kb"] is not None:
        kb_bytes = s["weight_kb"] * 1024
        print(
            f"  weight_kb {s['weight_kb']} = {kb_bytes:.0f} bytes; overhead (scales, biases, "
            f"metadata) {s['file_bytes'] - kb_bytes:.0f} bytes"
        )
    print(
        f"  BatchNorm: {len(bn['folded'])} folded into the per-channel affine, "
        f"{len(bn['kept'])} kept{(' (' + ', '.join(bn['kept']) + ')') if bn['kept'] else ''}"
    )
    if "onnx" in s:
        print(f"  ONNX: {s['onnx']}")
    return 0
