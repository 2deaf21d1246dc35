"""`qexp sensitivity RUN_DIR`: how much each layer of a trained run suffers at fewer bits.

Rebuilds the run from ``RUN_DIR/.hydra/config.yaml`` and its checkpoint (as ``qexp export``
does), measures every quantizable layer on the validation split (qexp.analysis.sensitivity),
and writes into ``RUN_DIR/sensitivity/`` (or ``--out``): ``sensitivity.md`` (ranked table),
``sensitivity.csv``, ``sensitivity.json``, ``sensitivity.png`` and, with ``--budget-kb``, the
suggested per-layer weight bits as ``experiment/overrides_<budget>kb.yaml``, which
``qexp train --config-dir OUT +experiment=overrides_<budget>kb ...`` takes as is.

Example::

    qexp sensitivity runs/2024-01-01_12-00-00/ste-w4a4 --bits 2,3,4,8 --budget-kb 20
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from qexp.errors import QexpError

DEFAULT_BITS = "2,3,4,8"


def _bits(text: str) -> tuple[int, ...]:
    try:
        bits = tuple(int(b) for b in text.split(",") if b.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"--bits {text!r}: use integers, e.g. 2,3,4,8") from None
    if not bits or any(not 1 <= b <= 16 for b in bits):
        raise argparse.ArgumentTypeError(f"--bits {text!r}: use bit widths in 1..16")
    return bits


def overrides_name(budget_kb: float) -> str:
    """``overrides_20kb`` / ``overrides_12p5kb``: a config name Hydra accepts."""
    text = f"{budget_kb:g}".replace(".", "p")
    return f"overrides_{text}kb"


def _take(batches: list[Any], samples: int) -> list[Any]:
    """The first ``samples`` samples of ``batches`` (cut within the last batch)."""
    out, left = [], samples
    for x, y in batches:
        if left <= 0:
            break
        out.append((x[:left], y[:left]))
        left -= int(y.numel())
    return out


def run_command_line(run_dir: Path, exclude: tuple[str, ...] = ("layers.overrides",)) -> str:
    """The run's own command-line overrides (from ``.hydra/overrides.yaml``), without Hydra's
    and those in ``exclude``, for the printed ``qexp train`` line."""
    import yaml

    path = run_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return ""
    items = [str(o) for o in yaml.safe_load(path.read_text()) or []]
    keep = [
        o
        for o in items
        if not o.lstrip("+~").startswith("hydra") and o.lstrip("+~").split("=")[0] not in exclude
    ]
    return " ".join(f"'{o}'" if any(c in o for c in " [{*?") else o for o in keep)


def sensitivity_run(
    run_dir: Path,
    out_dir: Path | None = None,
    bits: tuple[int, ...] = (2, 3, 4, 8),
    budget_kb: float | None = None,
    probes: int = 32,
    hessian_samples: int = 256,
    keep_edges: bool = False,
    checkpoint: str = "best",
    seed: int = 0,
    log=print,
) -> dict[str, Any]:
    """Measure ``run_dir`` and write the report; returns the paths and the suggestion."""
    import torch

    from qexp.analysis.report import write_report
    from qexp.analysis.sensitivity import measure_sensitivity, suggest_bits, weight_kb
    from qexp.export.write import load_run

    run_dir = Path(run_dir)
    out_dir = Path(out_dir) if out_dir is not None else run_dir / "sensitivity"
    spec, data, model, _ = load_run(run_dir, checkpoint)
    device = torch.device("cpu")
    val = list(data.eval_batches("val", int(spec.trainer.eval_batch_size), device))
    if not val or sum(int(y.numel()) for _, y in val) == 0:
        raise QexpError(f"{run_dir}: the data set has no validation split to measure on")
    hessian = _take(val, hessian_samples)
    table = measure_sensitivity(
        model.net, val, hessian, bits=bits, probes=probes, seed=seed, progress=log
    )
    result: dict[str, Any] = {"table": table}
    suggestion, name, comment = None, None, []
    if budget_kb is not None:
        fixed = (
            {r.name: r.w_bits for r in table.layers if r.role in ("first", "last")}
            if keep_edges
            else None
        )
        picks = suggest_bits(table, budget_kb, fixed=fixed)
        suggestion = [{"match": n, "w_bits": b} for n, b in picks.items()]
        name = overrides_name(budget_kb)
        size = weight_kb(table, picks)
        free = {n: b for n, b in picks.items() if n not in (fixed or {})}
        proxy = sum(table.row(n).proxy(b) for n, b in free.items())
        args = run_command_line(run_dir)
        command = f"qexp train --config-dir {out_dir} +experiment={name} {args}".rstrip()
        comment = [
            f"suggested by qexp sensitivity for {run_dir} (weight budget {budget_kb:g} KB):",
            f"packed weights {size:.2f} KB, summed proxy {proxy:.4g}"
            + (" (first and last layers kept at the run's bits)" if keep_edges else ""),
            f"use: {command}",
        ]
        result.update(picks=picks, weight_kb=size, command=command)
    paths = write_report(table, out_dir, suggestion, name, comment)
    result["paths"] = paths
    return result


def main(argv: list[str]) -> int:
    """`qexp sensitivity RUN_DIR [--bits 2,3,4,8] [--budget-kb KB] [--probes N] ...`."""
    p = argparse.ArgumentParser(
        prog="qexp sensitivity",
        description="Per-layer accuracy and Hessian-trace proxy at a few weight bit widths, "
        "and (with --budget-kb) per-layer bits that meet a weight budget.",
    )
    p.add_argument("run_dir", type=Path, help="a finished run dir (float or quantized)")
    p.add_argument(
        "--bits",
        type=_bits,
        default=_bits(DEFAULT_BITS),
        help=f"weight bit widths to try per layer (default {DEFAULT_BITS})",
    )
    p.add_argument(
        "--budget-kb",
        type=float,
        default=None,
        help="suggest per-layer bits whose packed weights fit this many KB",
    )
    p.add_argument(
        "--keep-edges",
        action="store_true",
        help="keep the first and last layers at the run's bits in the suggestion",
    )
    p.add_argument("--probes", type=int, default=32, help="Hutchinson probes (default 32)")
    p.add_argument(
        "--hessian-samples",
        type=int,
        default=256,
        help="validation samples in the Hessian estimate (default 256)",
    )
    p.add_argument("--checkpoint", default="best", help="best (default), last, or a .pt file")
    p.add_argument("--seed", type=int, default=0, help="seed of the Hutchinson probes")
    p.add_argument(
        "--out", type=Path, default=None, help="output dir (default RUN_DIR/sensitivity)"
    )
    args = p.parse_args(argv)
    if args.probes < 1 or args.hessian_samples < 1:
        print("qexp: error: --probes and --hessian-samples must be >= 1", file=sys.stderr)
        return 2
    if args.budget_kb is not None and args.budget_kb <= 0:
        print("qexp: error: --budget-kb must be positive", file=sys.stderr)
        return 2
    try:
        result = sensitivity_run(
            args.run_dir,
            args.out,
            args.bits,
            args.budget_kb,
            args.probes,
            args.hessian_samples,
            args.keep_edges,
            args.checkpoint,
            args.seed,
        )
    except QexpError as exc:
        print(f"qexp: error: {exc}", file=sys.stderr)
        return 2
    paths = result["paths"]
    print(f"wrote {paths['markdown']}, {paths['csv'].name}, {paths['figure'].name}")
    if "overrides" in paths:
        print(
            f"suggested bits ({result['weight_kb']:.2f} KB): "
            + ", ".join(f"{n}={b}" for n, b in result["picks"].items())
        )
        print(f"wrote {paths['overrides']}; train with:\n  {result['command']}")
    return 0


if __name__ == "__main__":  # until `qexp sensitivity` is registered in qexp.cli
    raise SystemExit(main(sys.argv[1:]))
