"""Turn a float model into a quantized one by swapping its Conv2d/Linear layers in place.

What each layer becomes is a :class:`~qexp.quant.overrides.LayerPlan` row: its role (first,
last or body), its weight and input bits and any quantizer options set by ``layers.overrides``.
A layer at 32 bits gets no quantizer for that side; a layer kept in float is still a
:class:`~qexp.quant.layers.QuantLayer`, with no quantizers at all, so every reader of the
quantized layers (layer table, cost report, budget, export) lists it at 32 bits.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn

from qexp.quant.base import Quantizer
from qexp.quant.layers import QConv2d, QEmbedding, QLinear, QMatMul, QuantLayer
from qexp.quant.overrides import FLOAT_BITS, LayerPlan, PlanRow, resolve_plan, side_rows
from qexp.quant.per_token import PerTokenQuantizer
from qexp.quant.refs import keep_reference

#: Builds a quantizer for (role, bits); returns None for 32 bits (full precision). Called as
#: ``factory(role, bits, options)`` for a layer whose rules set quantizer options (a mapping
#: merged over the role's config node, see qexp.quant.overrides.layer_quantizer_spec).
QuantizerFactory = Callable[..., Quantizer | None]


@dataclass
class LayerBits:
    """Bit widths of one layer's weight and input activation (32 = full precision; 1.58 =
    ternary, qexp.bitwidth)."""

    w_bits: float
    a_bits: float


def _swap(parent: nn.Module, name: str, new: nn.Module) -> None:
    setattr(parent, name, new)


def pin_bits(q: Quantizer | None) -> None:
    """Keep a learned-precision quantizer at the bits it was built with.

    A layer whose bits a rule sets is not part of the precision search: its bit range shrinks
    to that one width and it no longer reports ``learns_bits``, so memory budgets count it at
    those bits, as a constant (qexp.quant.budget). The step and range still train.
    """
    if q is None or not getattr(q, "learns_bits", False):
        return
    bits = int(q._bits) if hasattr(q, "_bits") else int(q.bits)
    q.b_min = q.b_max = bits
    q.learns_bits = False  # an instance attribute over the class's True


def _build(
    factory: QuantizerFactory, role: str, bits: int, options: Mapping[str, Any] | None
) -> Quantizer | None:
    # no options: the call every factory has always answered (identical quantizers)
    return factory(role, bits, options) if options else factory(role, bits)


def layer_quantizers(
    row: PlanRow, body: QuantizerFactory, edge: QuantizerFactory
) -> tuple[Quantizer | None, Quantizer | None]:
    """The weight and input quantizers of one plan row (edge factory for first/last)."""
    factory = body if row.role == "body" else edge
    wq = _build(factory, "weight", row.w_bits, row.quantizer.get("weight"))
    aq = _build(factory, "activation", row.a_bits, row.quantizer.get("activation"))
    if row.w_fixed:
        pin_bits(wq)
    if row.a_fixed:
        pin_bits(aq)
    return wq, aq


def apply_plan(
    net: nn.Module, plan: LayerPlan, body: QuantizerFactory, edge: QuantizerFactory
) -> list[str]:
    """Swap every wrappable layer of ``plan`` in ``net`` for its quantized counterpart, then
    its embeddings and products (rows of ``layers.embed_bits`` / ``layers.matmul_bits``).

    Layers qexp cannot wrap (kept in float by a rule) stay as they are, as do embeddings kept
    in float. Returns the names of the swapped conv/linear layers, in order.
    """
    names = []
    for row in plan.wrapped:
        module = net.get_submodule(row.name)
        wq, aq = layer_quantizers(row, body, edge)
        cls = QConv2d if isinstance(module, nn.Conv2d) else QLinear
        new = cls.from_float(module, wq, aq, row.role)
        parent_name, _, attr = row.name.rpartition(".")
        _swap(net.get_submodule(parent_name) if parent_name else net, attr, new)
        names.append(row.name)
    _swap_side_rows(net, plan)
    return names


def _swap_side_rows(net: nn.Module, plan: LayerPlan) -> list[str]:
    """Quantize the embedding tables and products of ``plan`` (float rows stay as they are);
    returns the swapped names."""
    names = []
    for row in plan.embeddings:
        module = net.get_submodule(row.name)
        if row.w_bits < FLOAT_BITS and not isinstance(module, QEmbedding):
            # one symmetric absmax scale per row: rows are looked up one by one, so a row's
            # scale is all a lookup needs; an edge layer, trained straight through
            quantizer = PerTokenQuantizer(int(row.w_bits), "weight")
            _swap_named(net, row.name, QEmbedding.from_float(module, quantizer, None, "embed"))
            names.append(row.name)
    for row in plan.products:
        if not isinstance(net.get_submodule(row.name), QMatMul):
            bits = int(row.a_bits)
            new = QMatMul(PerTokenQuantizer(bits, "activation"),
                          PerTokenQuantizer(bits, "activation"))  # fmt: skip
            _swap_named(net, row.name, new)
            names.append(row.name)
    return names


def quantize_model(
    net: nn.Module,
    body: QuantizerFactory,
    edge: QuantizerFactory,
    body_bits: LayerBits,
    first_bits: int | None,
    last_bits: int | None,
    plan: LayerPlan | None = None,
) -> list[str]:
    """Replace every nn.Conv2d / nn.Linear of ``net`` by its quantized counterpart.

    The first and last such layers (in registration order) are "edge" layers: when
    ``first_bits`` / ``last_bits`` is given they use it for weight and input, with the ``edge``
    quantizer and plain STE; ``None`` treats them like every other layer. ``plan`` (from
    :func:`~qexp.quant.overrides.resolve_plan` with the same bits and the run's
    ``layers.overrides``) changes single layers; without it every layer follows that policy.

    Returns the names of the swapped layers, in order.
    """
    if plan is None:
        plan = resolve_plan(net, [], body_bits, first_bits, last_bits)
    return apply_plan(net, plan, body, edge)


def _swap_named(net: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    _swap(net.get_submodule(parent_name) if parent_name else net, attr, new)


def quantize_embeddings(net: nn.Module, bits: int | None) -> list[str]:
    """Give every nn.Embedding of ``net`` a table quantized at ``bits`` (None: keep float),
    one symmetric absmax scale per row, an edge layer ("embed" role) trained straight
    through: what ``layers.embed_bits`` does without override rules. Returns the swapped
    names."""
    if bits is None:
        return []
    return _swap_side_rows(net, LayerPlan(tuple(side_rows(net, bits, None).values())))


def quantize_matmuls(net: nn.Module, bits: int | None) -> list[str]:
    """Quantize both inputs of every activation-activation product of ``net`` (modules that
    declare ``quantizable_product``, e.g. qexp.models.layers.MatMul) at ``bits`` with the
    per-token absmax grid (None: keep them float): what ``layers.matmul_bits`` does."""
    if bits is None:
        return []
    return _swap_side_rows(net, LayerPlan(tuple(side_rows(net, None, bits).values())))


def attach_estimator(net: nn.Module, estimator: nn.Module) -> None:
    """Point every body layer's training forward at ``estimator`` (edge layers keep STE)."""
    for m in net.modules():
        if isinstance(m, QuantLayer):
            keep_reference(m, "estimator", estimator if m.layer_role == "body" else None)
