"""The trainer's seam for bit widths and memory budgets.

One object per run, built by the composition root from the quantizer group's budget keys
(qexp.quant.budget). It adds
the budget penalty to each step's loss, logs each layer's bit widths and the model's sizes to
TensorBoard when they can change (learned precision; constant ones only go to the Text tab's
per-layer table), tells the trainer whether the network meets its budget (only such epochs can be
the reported best), and adds the per-layer table (as text and as a bar chart) and the sizes to
the final report. Without a budget it only logs and reports.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.tensorboard import SummaryWriter

from qexp.quant.budget import BudgetPenalty, measure_layers
from qexp.quant.layers import quant_layers

_KB = 8 * 1024


class PrecisionMonitor:
    """Budget penalty, bit-width logging and budget checks for one network.

    Args:
        net: the quantized network (the layers are found once; the object stays the same
            when checkpoints are loaded into it).
        budget: the run's budget (inactive when none is configured).
        example: one input batch (a single sample is enough) to measure activation sizes.
    """

    def __init__(self, net: nn.Module, budget: BudgetPenalty, example: Tensor) -> None:
        self.net = net
        self.budget = budget
        budget.bind(measure_layers(net, example))
        self._last_penalty: Tensor | None = None
        #: whether any bit width can change in training (else bits and sizes are constants)
        self.learned = any(
            q is not None and q.learns_bits
            for _, layer in quant_layers(net)
            for q in (layer.w_quant, layer.a_quant)
        )

    # -- per step --------------------------------------------------------------------------------
    def penalty(self) -> Tensor | float:
        """The budget penalty to add to this step's loss (0.0 without a budget)."""
        if not self.budget.active:
            return 0.0
        penalty = self.budget()
        self._last_penalty = penalty.detach()  # read only at log steps: no sync per step
        return penalty

    def log(self, writer: SummaryWriter, step: int) -> None:
        """With learned precision: each layer's bits (``width/<layer>/w`` and ``/a``) and the
        model sizes (``width/weight_kb``, ``width/act_kb``); with a budget: the penalty.

        ``width`` sorts after the ``test``, ``train`` and ``val`` groups of TensorBoard's Time
        Series view (it orders groups by name and opens the first two)."""
        if self.learned:
            for name, layer in quant_layers(self.net):
                writer.add_scalar(f"width/{name}/w", layer.w_bits, step)
                writer.add_scalar(f"width/{name}/a", layer.a_bits, step)
            with torch.no_grad():
                writer.add_scalar("width/weight_kb", float(self.budget.weight_kb()), step)
                writer.add_scalar("width/act_kb", float(self.budget.act_kb()), step)
        if self._last_penalty is not None:
            writer.add_scalar("train/budget_penalty", float(self._last_penalty), step)

    # -- checks ----------------------------------------------------------------------------------
    def satisfied(self) -> bool:
        """Whether the network meets every configured budget now (True without a budget)."""
        return not self.budget.violations()

    def unmet(self) -> str | None:
        """``"budget not met (...)"`` when a budget is exceeded now, else None."""
        bad = self.budget.violations()
        return f"budget not met ({'; '.join(bad)})" if bad else None

    def epoch_summary(self) -> dict[str, Any]:
        """Sizes now (and whether the budget is met), for the per-epoch history."""
        with torch.no_grad():
            out: dict[str, Any] = {
                "weight_kb": round(float(self.budget.weight_kb()), 3),
                "act_kb": round(float(self.budget.act_kb()), 3),
            }
        if self.budget.active:
            out["budget_met"] = self.satisfied()
        return out

    # -- final report ----------------------------------------------------------------------------
    def final(self, writer: SummaryWriter, table: list[dict[str, Any]], step: int) -> dict:
        """Add act_kb to each row of ``table``, write it to TensorBoard's Text tab (and, with
        learned precision, as a bar chart); return metrics entries."""
        elems = {ls.name: ls.act_elems for ls in self.budget.layers}
        for row in table:
            a_bits = row["a_bits"]
            row["act_kb"] = round(elems.get(row["name"], 0) * a_bits / _KB, 3)
        writer.add_text("layers", markdown_table(table), step)
        if self.learned:
            writer.add_figure("width/per_layer", bits_figure(table), step, close=False)
        out: dict[str, Any] = self.epoch_summary()
        out.pop("weight_kb")  # the trainer reports weight_kb from the table itself
        out["act_kb_mode"] = self.budget.act_budget_mode
        if self.budget.active:
            out.update(self.budget.summary())
        return out


def markdown_table(table: list[dict[str, Any]]) -> str:
    """The per-layer table (name, role, params, bits, sizes) as Markdown."""
    lines = [
        "| layer | role | params | w_bits | a_bits | weight KB | act KB | set by |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in table:
        lines.append(
            f"| {r['name']} | {r['role']} | {r['params']} | {r['w_bits']} | {r['a_bits']} | "
            f"{r['kb']:.2f} | {r.get('act_kb', float('nan')):.2f} | {r.get('set_by') or '-'} |"
        )
    total = sum(r["kb"] for r in table)
    lines.append(f"| total | | {sum(r['params'] for r in table)} | | | {total:.2f} | | |")
    return "\n".join(lines)


def bits_figure(table: list[dict[str, Any]]):
    """Bar chart of weight and activation bits per layer (matplotlib, Agg canvas)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # A bare Figure with an Agg canvas: no pyplot state, works without a display.
    fig = Figure(figsize=(max(4.0, 0.6 * len(table) + 2), 3.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    xs = range(len(table))
    width = 0.4
    ax.bar([x - width / 2 for x in xs], [r["w_bits"] for r in table], width, label="weights")
    ax.bar([x + width / 2 for x in xs], [r["a_bits"] for r in table], width, label="inputs")
    ax.set_xticks(list(xs))
    ax.set_xticklabels([r["name"] for r in table], rotation=45, ha="right", fontsize=7)
    ax.set_ylabel("bits")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig
