"""Writers of a sensitivity table: Markdown, CSV, a figure and the suggested overrides YAML.

The YAML is a Hydra config file in an ``experiment/`` folder, so ``qexp train`` takes it as
is through ``--config-dir`` (the folder above ``experiment/``) and ``+experiment=NAME``::

    qexp train --config-dir RUN_DIR/sensitivity +experiment=overrides_20kb model=... bits=4

It sets ``layers.overrides`` only; the rest of the run (model, data, quantizer, bits) is the
command line's, so the same file can seed runs with any estimator.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from qexp.analysis.sensitivity import SensitivityTable

EXPERIMENT_DIR = "experiment"


def _pct(v: float) -> str:
    return f"{100 * v:.2f}"


def to_markdown(table: SensitivityTable) -> str:
    """The ranked table: layer, type, role, params, the run's bits, Hessian trace (with its
    standard error), and per bit width the accuracy, its drop from the run and the proxy."""
    bits = table.bits
    head = ["rank", "layer", "type", "role", "params", "w/a bits", "trace (± se)"]
    head += [f"acc@{b} (drop)" for b in bits] + [f"proxy@{b}" for b in bits]
    lines = [
        f"Validation accuracy of the run: {_pct(table.base_acc)}%. Each row takes only that "
        "layer's weights to b bits (per-channel uniform grid); the proxy is tr(H)/n "
        f"* ||Q_b(w) - w||^2 (Hutchinson, {table.probes} probes on {table.samples} samples). "
        f"Rank agreement (Spearman) of proxy and accuracy drop at {min(bits)} bits: "
        f"{table.rank_agreement():.2f}.",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "|".join("---:" if i in (0, 4) or i > 5 else "---" for i in range(len(head))) + "|",
    ]
    for i, r in enumerate(table.ranked(), 1):
        cells = [
            str(i),
            r.name,
            r.kind,
            r.role,
            str(r.params),
            f"{r.w_bits}/{r.a_bits}",
            f"{r.trace:.4g} (± {r.trace_stderr:.2g})",
        ]
        cells += [f"{_pct(r.acc[b])} ({_pct(table.drop(r, b))})" for b in bits]
        cells += [f"{r.proxy(b):.3g}" for b in bits]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def to_csv(table: SensitivityTable) -> str:
    """One row per layer (ranked), machine-readable: the quantities of :func:`to_markdown`
    plus ``qerr@b`` and the average trace."""
    bits = table.bits
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    header = [
        "rank",
        "layer",
        "type",
        "role",
        "params",
        "w_bits",
        "a_bits",
        "trace",
        "trace_stderr",
        "avg_trace",
    ]
    for b in bits:
        header += [f"acc@{b}", f"drop@{b}", f"qerr@{b}", f"proxy@{b}"]
    writer.writerow(header)
    for i, r in enumerate(table.ranked(), 1):
        row: list[Any] = [
            i,
            r.name,
            r.kind,
            r.role,
            r.params,
            r.w_bits,
            r.a_bits,
            f"{r.trace:.6g}",
            f"{r.trace_stderr:.6g}",
            f"{r.avg_trace:.6g}",
        ]
        for b in bits:
            row += [
                f"{r.acc[b]:.6f}",
                f"{table.drop(r, b):.6f}",
                f"{r.qerr[b]:.6g}",
                f"{r.proxy(b):.6g}",
            ]
        writer.writerow(row)
    return out.getvalue()


def figure(table: SensitivityTable):
    """Two panels over the layers (network order): accuracy drop per bit width, and the
    proxy per bit width (log scale). A bare matplotlib Figure on an Agg canvas."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = table.layers
    n, bits = len(rows), table.bits
    fig = Figure(figsize=(max(5.0, 0.55 * n + 2.5), 5.6))
    FigureCanvasAgg(fig)
    top, bottom = fig.add_subplot(2, 1, 1), fig.add_subplot(2, 1, 2, sharex=None)
    width = 0.8 / len(bits)
    xs = range(n)
    for k, b in enumerate(bits):
        offs = [x - 0.4 + width * (k + 0.5) for x in xs]
        top.bar(offs, [100 * table.drop(r, b) for r in rows], width, label=f"{b} bits")
        proxies = [max(r.proxy(b), 1e-12) for r in rows]
        bottom.bar(offs, proxies, width, label=f"{b} bits")
    top.set_ylabel("accuracy drop (points)")
    top.axhline(0, color="black", linewidth=0.5)
    top.set_title("only this layer's weights at b bits", fontsize=9, loc="left")
    bottom.set_yscale("log")
    bottom.set_ylabel("tr(H)/n · ||Q(w) − w||²")
    for ax in (top, bottom):
        ax.set_xticks(list(xs))
        ax.set_xticklabels([r.name for r in rows], rotation=45, ha="right", fontsize=7)
    # one legend above the panels, clear of the bars
    top.legend(
        fontsize=7, ncol=len(bits), loc="lower right", bbox_to_anchor=(1.0, 1.0), frameon=False
    )
    fig.tight_layout()
    return fig


def overrides_yaml(rules: Sequence[dict[str, Any]], comment: Sequence[str] = ()) -> str:
    """A Hydra config file that sets ``layers.overrides`` to ``rules`` (global package, so it
    can live in any config group, e.g. ``experiment/``)."""
    # the package line first: Hydra reads it from the file's leading comment lines
    lines = ["# @package _global_", *(f"# {c}" for c in comment), "layers:", "  overrides:"]
    for rule in rules:
        inner = ", ".join(f"{k}: {_scalar(v)}" for k, v in rule.items())
        lines.append(f"    - {{{inner}}}")
    if not rules:
        lines[-1] = "  overrides: []"
    return "\n".join(lines) + "\n"


def _scalar(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    text = str(v)
    return "'" + text.replace("'", "''") + "'"  # YAML single-quoted: glob and regex chars safe


def write_report(
    table: SensitivityTable,
    out_dir: Path,
    suggestion: Sequence[dict[str, Any]] | None = None,
    name: str | None = None,
    comment: Sequence[str] = (),
) -> dict[str, Path]:
    """Write ``sensitivity.md``, ``sensitivity.csv``, ``sensitivity.json``,
    ``sensitivity.png`` and (with a suggestion) ``experiment/<name>.yaml`` into ``out_dir``;
    returns their paths by kind."""
    import json

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "markdown": out_dir / "sensitivity.md",
        "csv": out_dir / "sensitivity.csv",
        "json": out_dir / "sensitivity.json",
        "figure": out_dir / "sensitivity.png",
    }
    paths["markdown"].write_text(to_markdown(table))
    paths["csv"].write_text(to_csv(table))
    paths["json"].write_text(json.dumps(table.to_json(), indent=2) + "\n")
    figure(table).savefig(paths["figure"], dpi=120)
    if suggestion is not None:
        path = out_dir / EXPERIMENT_DIR / f"{name or 'overrides'}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(overrides_yaml(suggestion, comment))
        paths["overrides"] = path
    return paths
