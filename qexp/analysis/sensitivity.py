"""Per-layer sensitivity of a trained network to the bit width of its weights.

For each quantizable layer and each bit width b of a few choices:

- ``acc[b]``: validation accuracy with *only* that layer's weights quantized to b bits (a
  fresh weight quantizer swapped in for the measurement and taken out again; every other layer,
  and the layer's input quantizer, as in the run);
- ``qerr[b]``: the quantization error ``||Q_b(w) - w||^2`` of that quantizer on the weights;
- ``proxy[b] = tr(H) / n * qerr[b]``: a second-order estimate of the loss increase (HAWQ-v2's
  Omega), with ``tr(H)`` the Hutchinson estimate of the trace of the loss Hessian with respect
  to the layer's n weights (qexp.analysis.hutchinson). ``tr(H) / n`` is the Hessian's average
  curvature: for an error spread evenly over the weights, ``E[dw^T H dw] = tr(H) / n ||dw||^2``.

The Hessian is that of the float network at the run's weights (quantization off, eval mode,
as HAWQ does): the hard quantizers' staircase has no useful second derivative, and with
activation quantization on no gradient reaches the earlier layers.

:func:`suggest_bits` picks one bit width per layer that meets a weight budget (packed bytes
``ceil(params * bits / 8)``, as qexp.quant.cost counts them) with the smallest total proxy;
:func:`suggest_overrides` writes that choice as ``layers.overrides`` rules.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qexp.analysis.hutchinson import TraceEstimate, hutchinson_traces
from qexp.errors import QexpError
from qexp.quant.base import Quantizer
from qexp.quant.layers import QuantLayer, quant_layers, quant_mode
from qexp.quant.overrides import FLOAT_BITS, kind_of
from qexp.quant.refs import keep_reference
from qexp.quant.uniform import UniformQuantizer

DEFAULT_BITS = (2, 3, 4, 8)
Batch = tuple[Tensor, Tensor]
#: builds the weight quantizer a layer is measured with at ``bits``
WeightQuantizerFactory = Callable[[int], Quantizer]


def default_weight_quantizer(bits: int) -> Quantizer:
    """Per-channel uniform grid with MSE-optimal clipping, derived from the weights alone (so
    it needs no training or calibration, whatever quantizer the run used)."""
    return UniformQuantizer(bits, "weight", per_channel=True, scale_method="mse")


# -- swapping one layer's weight quantizer -------------------------------------------------------
@contextmanager
def weight_quantizer(layer: QuantLayer, quantizer: Quantizer | None):
    """Temporarily compute ``layer`` with ``quantizer`` on its weights and no estimator (so the
    deployed weight is ``quantizer.hard(w)``); the layer is restored exactly afterwards."""
    saved_q = layer.w_quant
    in_modules = "w_quant" in layer._modules
    saved_est = vars(layer).get("estimator")
    if quantizer is not None:
        quantizer = quantizer.to(layer.weight.device)
        quantizer.train(layer.training)
    # write nn.Module's slots directly: the submodule keeps its place in the module order,
    # so state_dict keys come back in the same order
    if in_modules:
        layer._modules["w_quant"] = quantizer
    else:  # a layer built without a weight quantizer holds None as a plain attribute
        vars(layer).pop("w_quant", None)
        layer._modules["w_quant"] = quantizer
    keep_reference(layer, "estimator", None)
    try:
        yield layer
    finally:
        if in_modules:
            layer._modules["w_quant"] = saved_q
        else:
            layer._modules.pop("w_quant", None)
            keep_reference(layer, "w_quant", saved_q)
        keep_reference(layer, "estimator", saved_est)


# -- evaluation ----------------------------------------------------------------------------------
def _iterate(batches: Iterable[Batch] | Callable[[], Iterable[Batch]]) -> Iterable[Batch]:
    return batches() if callable(batches) else batches


def top1_correct(logits: Tensor, y: Tensor) -> int:
    """Number of samples whose largest logit is the label."""
    return int((logits.argmax(dim=1) == y).sum())


@torch.no_grad()
def accuracy(
    net: nn.Module,
    batches: Iterable[Batch] | Callable[[], Iterable[Batch]],
    correct: Callable[[Tensor, Tensor], int] = top1_correct,
) -> float:
    """Accuracy of ``net`` (eval mode: hard-quantized layers) over ``batches``."""
    was_training = net.training
    net.eval()
    hits = total = 0
    try:
        for x, y in _iterate(batches):
            hits += correct(net(x), y)
            total += int(y.numel())
    finally:
        net.train(was_training)
    if total == 0:
        raise QexpError("sensitivity: the validation batches are empty")
    return hits / total


def hessian_traces(
    net: nn.Module,
    layers: Sequence[tuple[str, QuantLayer]],
    batches: Sequence[Batch],
    loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
    probes: int = 32,
    seed: int = 0,
) -> dict[str, TraceEstimate]:
    """Hutchinson trace of the float network's loss Hessian for each layer's weight.

    The loss is the mean of ``loss_fn`` over ``batches`` (all kept in one graph: use a few
    hundred samples). Runs in eval mode with quantization off; nothing is left changed.
    """
    if not batches:
        raise QexpError("sensitivity: no batches for the Hessian estimate")
    weights = [layer.weight for _, layer in layers]
    saved = [w.requires_grad for w in weights]
    was_training = net.training
    net.eval()

    def loss() -> Tensor:
        total = sum(loss_fn(net(x), y) for x, y in batches)
        return total / len(batches)

    try:
        for w in weights:
            w.requires_grad_(True)
        with torch.enable_grad(), quant_mode(net, "off"):
            estimates = hutchinson_traces(loss, weights, probes=probes, seed=seed)
    finally:
        for w, s in zip(weights, saved, strict=True):
            w.requires_grad_(s)
        net.train(was_training)
    return {name: est for (name, _), est in zip(layers, estimates, strict=True)}


# -- the table -----------------------------------------------------------------------------------
@dataclass
class LayerSensitivity:
    """Sensitivity of one layer (see the module docstring for the quantities)."""

    name: str
    kind: str
    role: str
    params: int
    w_bits: int
    a_bits: int
    trace: float
    trace_stderr: float
    acc: dict[int, float] = field(default_factory=dict)
    qerr: dict[int, float] = field(default_factory=dict)

    @property
    def avg_trace(self) -> float:
        """``tr(H) / n``, floored at 0 (a negative estimate is noise around a flat direction,
        and a negative proxy would reward fewer bits)."""
        return max(self.trace, 0.0) / max(self.params, 1)

    def proxy(self, bits: int) -> float:
        """``tr(H) / n * ||Q_bits(w) - w||^2`` (0 at full precision)."""
        return 0.0 if bits >= FLOAT_BITS else self.avg_trace * self.qerr[bits]

    def weight_bytes(self, bits: int) -> int:
        """Packed weight bytes at ``bits`` (``ceil(params * bits / 8)``, as qexp.quant.cost)."""
        return math.ceil(self.params * bits / 8)


@dataclass
class SensitivityTable:
    """Every layer's sensitivity, with what it was measured against."""

    base_acc: float
    bits: tuple[int, ...]
    layers: list[LayerSensitivity]
    probes: int
    samples: int

    def drop(self, row: LayerSensitivity, bits: int) -> float:
        """Accuracy lost (base minus measured) with only ``row`` at ``bits``."""
        return self.base_acc - row.acc[bits]

    def ranked(self) -> list[LayerSensitivity]:
        """Layers, most sensitive first: by the proxy at the fewest bits, then by the
        accuracy drop there."""
        b = min(self.bits)
        return sorted(self.layers, key=lambda r: (-r.proxy(b), -self.drop(r, b), r.name))

    def row(self, name: str) -> LayerSensitivity:
        for r in self.layers:
            if r.name == name:
                return r
        raise KeyError(name)

    def rank_agreement(self, bits: int | None = None) -> float:
        """Spearman rank correlation between the proxy and the measured accuracy drop at
        ``bits`` (default: the fewest) over the layers: how well the cheap proxy orders the
        layers like the expensive measurement (nan for fewer than 3 layers)."""
        b = min(self.bits) if bits is None else bits
        if len(self.layers) < 3:
            return float("nan")
        return spearman([r.proxy(b) for r in self.layers], [self.drop(r, b) for r in self.layers])

    def to_json(self) -> dict[str, Any]:
        return {
            "base_acc": self.base_acc,
            "bits": list(self.bits),
            "probes": self.probes,
            "samples": self.samples,
            "layers": [
                {
                    "name": r.name,
                    "kind": r.kind,
                    "role": r.role,
                    "params": r.params,
                    "w_bits": r.w_bits,
                    "a_bits": r.a_bits,
                    "trace": r.trace,
                    "trace_stderr": r.trace_stderr,
                    "acc": {str(b): r.acc[b] for b in self.bits},
                    "qerr": {str(b): r.qerr[b] for b in self.bits},
                    "proxy": {str(b): r.proxy(b) for b in self.bits},
                }
                for r in self.ranked()
            ],
        }


def _ranks(values: Sequence[float]) -> list[float]:
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):  # ties share their average rank
            ranks[order[k]] = (i + j) / 2
        i = j + 1
    return ranks


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman rank correlation of two equally long sequences (nan if one is constant)."""
    ra, rb = _ranks(a), _ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb, strict=True))
    va = sum((x - ma) ** 2 for x in ra)
    vb = sum((y - mb) ** 2 for y in rb)
    return cov / math.sqrt(va * vb) if va > 0 and vb > 0 else float("nan")


def measure_sensitivity(
    net: nn.Module,
    val_batches: Iterable[Batch] | Callable[[], Iterable[Batch]],
    hessian_batches: Sequence[Batch],
    bits: Sequence[int] = DEFAULT_BITS,
    make_quantizer: WeightQuantizerFactory = default_weight_quantizer,
    loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
    correct: Callable[[Tensor, Tensor], int] = top1_correct,
    probes: int = 32,
    seed: int = 0,
    names: Sequence[str] | None = None,
    progress: Callable[[str], None] | None = None,
) -> SensitivityTable:
    """The sensitivity table of ``net``'s quantized layers (all, or those in ``names``).

    Args:
        net: a network with qexp quantized layers (a trained run's ``model.net``; float runs
            too: their layers simply have no quantizers).
        val_batches: (x, y) validation batches, iterated once per layer and bit width (a list,
            or a function returning a fresh iterator).
        hessian_batches: the few batches of the Hessian estimate.
        bits: the bit widths each layer is taken to.
        make_quantizer: the weight quantizer for a bit width (default: per-channel MSE
            uniform, see :func:`default_weight_quantizer`).
        probes, seed: Hutchinson probes and their seed.
        progress: called with a line per layer measured.

    The network's state is unchanged afterwards (its state_dict is bit-identical).
    """
    choices = tuple(sorted({int(b) for b in bits}))
    if not choices or any(not 1 <= b <= 16 for b in choices):
        raise QexpError(f"sensitivity: bit widths must lie in 1..16, got {list(bits)}")
    layers = quant_layers(net)
    if names is not None:
        unknown = sorted(set(names) - {n for n, _ in layers})
        if unknown:
            raise QexpError(
                f"sensitivity: no quantized layer {unknown[0]!r}; the layers are "
                f"{', '.join(n for n, _ in layers)}"
            )
        layers = [(n, m) for n, m in layers if n in set(names)]
    if not layers:
        raise QexpError("sensitivity: the network has no quantized layers")
    samples = sum(int(y.numel()) for _, y in hessian_batches)
    traces = hessian_traces(net, layers, hessian_batches, loss_fn, probes, seed)
    base = accuracy(net, val_batches, correct)
    rows = []
    for name, layer in layers:
        row = LayerSensitivity(
            name=name,
            kind=kind_of(layer),
            role=layer.layer_role,
            params=layer.weight.numel(),
            w_bits=int(layer.w_bits),
            a_bits=int(layer.a_bits),
            trace=traces[name].trace,
            trace_stderr=traces[name].stderr,
        )
        for b in choices:
            with weight_quantizer(layer, make_quantizer(b)) as swapped:
                with torch.no_grad():
                    w = swapped.weight.detach()
                    row.qerr[b] = float(((swapped.deployed_weight() - w) ** 2).sum())
                row.acc[b] = accuracy(net, val_batches, correct)
        rows.append(row)
        if progress is not None:
            accs = "  ".join(f"{b}b {row.acc[b]:.4f}" for b in choices)
            progress(f"{name}: trace {row.trace:.4g}  {accs}")
    return SensitivityTable(base, choices, rows, probes, samples)


# -- suggestion under a weight budget ------------------------------------------------------------
def suggest_bits(
    table: SensitivityTable,
    budget_kb: float,
    choices: Sequence[int] | None = None,
    fixed: Mapping[str, int] | None = None,
) -> dict[str, int]:
    """One bit width per layer whose packed weights fit ``budget_kb`` with the least total
    proxy (ties: fewer bytes).

    An exact multiple-choice knapsack by dynamic programming over the Pareto front of (bytes,
    proxy) sums, layer by layer: a greedy pass (take bits from the layer with the smallest
    proxy increase per byte saved) can miss the optimum because the proxy is not convex in the
    bits (3 -> 2 bits often costs far more than 4 -> 3), while the front of a few tens of
    layers with a handful of choices each stays small. ``fixed`` layers keep their bits and
    count against the budget. Raises QexpError when even the fewest bits do not fit.
    """
    choices = tuple(sorted({int(b) for b in (choices or table.bits)}))
    fixed = dict(fixed or {})
    for b in choices:
        if b not in table.bits and b < FLOAT_BITS:
            raise QexpError(
                f"sensitivity: {b} bits was not measured (measured: {list(table.bits)})"
            )
    budget_bytes = budget_kb * 1024
    free = [r for r in table.layers if r.name not in fixed]
    used = sum(table.row(n).weight_bytes(b) for n, b in fixed.items())
    smallest = used + sum(r.weight_bytes(choices[0]) for r in free)
    if smallest > budget_bytes + 1e-9:
        raise QexpError(
            f"sensitivity: a weight budget of {budget_kb:g} KB cannot be met: the fewest bits "
            f"({choices[0]}) give {smallest / 1024:.2f} KB; raise the budget or allow fewer bits"
        )
    # front: (bytes, proxy, choice per free layer so far), no state dominated by another
    front: list[tuple[int, float, tuple[int, ...]]] = [(used, 0.0, ())]
    for r in free:
        options = [
            (s + r.weight_bytes(b), p + r.proxy(b), picks + (b,))
            for s, p, picks in front
            for b in choices
        ]
        options = [o for o in options if o[0] <= budget_bytes + 1e-9]
        options.sort(key=lambda o: (o[0], o[1]))
        front = []
        for o in options:
            if not front or o[1] < front[-1][1]:
                front.append(o)
    best = min(front, key=lambda o: (o[1], o[0]))
    out = dict(fixed)
    out.update({r.name: b for r, b in zip(free, best[2], strict=True)})
    return {r.name: out[r.name] for r in table.layers}


def suggest_overrides(
    table: SensitivityTable,
    budget_kb: float,
    choices: Sequence[int] | None = None,
    fixed: Mapping[str, int] | None = None,
) -> list[dict[str, Any]]:
    """:func:`suggest_bits` as ``layers.overrides`` rules, one per layer (exact names):
    ``[{"match": "stage2.0", "w_bits": 2}, ...]``. Input bits stay as in the run."""
    picks = suggest_bits(table, budget_kb, choices, fixed)
    return [{"match": name, "w_bits": int(b)} for name, b in picks.items()]


def weight_kb(table: SensitivityTable, picks: Mapping[str, int]) -> float:
    """Packed weight size in KB of the layers at ``picks`` (bytes rounded up per layer)."""
    return sum(table.row(n).weight_bytes(b) for n, b in picks.items()) / 1024
