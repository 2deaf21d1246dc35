"""The deployed network of a quantized model as a plain op graph plus integer tensors.

The network is traced with torch.fx (quantized layers are leaves) and every node becomes a JSON
op the verifier can run without qexp's model classes. Quantized layers become ``qconv`` /
``qlinear`` ops holding:

- the weight as unsigned level indices ``k`` in ``0 .. levels-1`` of the layer's grid
  ``(k + offset) * step``, bit-packed at the layer's own bit width, with the step per
  output channel or per tensor; the indices are read off the *deployed* weight (what qexp's
  hard evaluation computes with, estimator-aware) and checked to reproduce it;
- the input quantizer as ``code = clamp(round(x / scale + shift), qmin, qmax)``, value
  ``(code - shift) * scale``, or ``sign`` (+-scale) for binary activations; checked against the
  quantizer's own hard map on a real batch;
- the bias, and a BatchNorm that directly follows (or follows through a max pool, when its
  per-channel scale is positive) folded into the per-channel affine after accumulation.
"""

from __future__ import annotations

import operator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from qexp.errors import QexpError
from qexp.export.pack import pack_codes
from qexp.quant.base import Grid, Quantizer
from qexp.quant.binary import BinaryQuantizer
from qexp.quant.layers import QConv2d, QMatMul, QuantLayer, quant_mode

Node = dict[str, Any]


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, QuantLayer) or super().is_leaf_module(m, qualname)


def _np(t: Tensor) -> np.ndarray:
    return t.detach().float().cpu().contiguous().numpy()


def _ints(v: Any) -> list[int]:
    return [int(v), int(v)] if isinstance(v, int) else [int(a) for a in v]


def _grid(name: str, q: Quantizer, x: Tensor) -> Grid:
    """The quantizer's uniform grid; quantizers without one cannot be exported."""
    try:
        return q.grid(x)
    except QexpError:
        raise QexpError(
            f"export: layer {name} uses {type(q).__name__}, whose levels are not a uniform grid; "
            "qexp export handles uniform and binary quantizers"
        ) from None


class GraphBuilder:
    """Collects op nodes and tensors while walking the traced network."""

    def __init__(self, net: nn.Module, inputs: dict[str, Tensor]) -> None:
        self.net = net
        self.inputs = inputs  # layer qualname -> a real input batch of that layer
        self.nodes: list[Node] = []
        self.tensors: dict[str, np.ndarray] = {}
        self.alias: dict[str, str] = {}

    def tensor(self, name: str, t: Tensor | np.ndarray) -> str:
        self.tensors[name] = t if isinstance(t, np.ndarray) else _np(t)
        return name

    def ref(self, arg: Any) -> str:
        if not isinstance(arg, fx.Node):
            raise QexpError(f"export: expected a tensor input, got the constant {arg!r}")
        return self.alias.get(arg.name, arg.name)

    def add(self, node: fx.Node, op: str, inputs: list[Any], **attrs: Any) -> None:
        self.nodes.append(
            {"name": node.name, "op": op, "inputs": [self.ref(a) for a in inputs], **attrs}
        )

    # -- quantized layers ---------------------------------------------------------------------
    def quant_layer(self, node: fx.Node, name: str, layer: QuantLayer) -> None:
        attrs: dict[str, Any] = {"module": name, "role": layer.layer_role}
        if isinstance(layer, QConv2d):
            if isinstance(layer.padding, str) or layer.padding_mode != "zeros":
                raise QexpError(
                    f"export: conv {name} uses padding {layer.padding!r} "
                    f"({layer.padding_mode}); only numeric zero padding is exported"
                )
            op = "qconv"
            attrs.update(
                stride=_ints(layer.stride),
                padding=_ints(layer.padding),
                dilation=_ints(layer.dilation),
                groups=int(layer.groups),
            )
        else:
            op = "qlinear"
        attrs["weight"] = self.weight(name, layer)
        attrs["act"] = self.activation(name, layer)
        attrs["bias"] = self.tensor(f"{name}.bias", layer.bias) if layer.bias is not None else None
        attrs["bn_scale"] = None
        self.add(node, op, [node.args[0]], **attrs)

    def weight(self, name: str, layer: QuantLayer) -> dict[str, Any]:
        with torch.no_grad():
            if layer.w_quant is None:
                return {"float": self.tensor(f"{name}.weight", layer.weight)}
            bits = int(layer.w_bits)
            wq = layer.deployed_weight().detach().float()
            rows = wq.reshape(wq.shape[0], -1)
            if bits == 1:
                # two levels +-a per channel, whatever the quantizer or estimator chose a to be
                a = rows.abs().amax(dim=1)
                step, offset, levels = 2 * a, -0.5, 2
            else:
                grid = _grid(name, layer.w_quant, layer.weight)
                step = grid.step.detach().float().reshape(-1)
                offset, levels = float(grid.offset), int(grid.num_levels)
            if levels > 2**bits:
                raise QexpError(f"export: layer {name} has {levels} weight levels at {bits} bits")
            view = step.reshape(-1, 1)
            k = torch.clamp(torch.round(rows / view - offset), 0, levels - 1)
            err = ((k + offset) * view - rows).abs().amax()
            if not err <= 1e-3 * float(step.abs().max()) + 1e-12:
                raise QexpError(
                    f"export: layer {name}'s deployed weights are not on its quantizer's grid "
                    f"(off by {float(err):.3g}); this quantizer/estimator cannot be exported"
                )
        return {
            "codes": self.tensor(
                f"{name}.codes", pack_codes(k.to(torch.int64).cpu().numpy(), bits)
            ),
            "count": int(k.numel()),
            "bits": bits,
            "shape": list(wq.shape),
            "offset": offset,
            "levels": levels,
            "scale": self.tensor(f"{name}.w_scale", step),
        }

    def activation(self, name: str, layer: QuantLayer) -> dict[str, Any] | None:
        aq: Quantizer | None = layer.a_quant
        if aq is None:
            return None
        x = self.inputs[name]
        with torch.no_grad():
            if isinstance(aq, BinaryQuantizer):
                desc: dict[str, Any] = {"kind": "sign", "scale": float(aq.act_scale)}
            else:
                grid = _grid(name, aq, x)
                if torch.as_tensor(grid.step).numel() != 1:
                    raise QexpError(
                        f"export: layer {name} scales its input per token at run time "
                        f"({type(aq).__name__}); the export format holds one static scale per "
                        "layer input: train with a per-tensor activation quantizer to export"
                    )
                offset, n = float(grid.offset), int(grid.num_levels)
                desc = {"kind": "grid", "scale": float(grid.step), "levels": n}
                if aq.rounds_then_clamps:
                    desc.update(shift=0.0, qmin=int(offset), qmax=int(offset) + n - 1)
                else:
                    desc.update(shift=-offset + 0.0, qmin=0, qmax=n - 1)
            mine = quantize_like(x, desc)
            err = float((mine - aq.hard(x)).abs().max())
            if err > 1e-4 * desc["scale"] + 1e-12:
                raise QexpError(
                    f"export: the input quantizer of layer {name} ({type(aq).__name__}) does not "
                    "map onto a uniform grid the exporter can describe"
                )
        return desc

    # -- everything else ----------------------------------------------------------------------
    def module(self, node: fx.Node, name: str, m: nn.Module) -> None:
        x = node.args[0]
        if isinstance(m, QuantLayer):
            self.quant_layer(node, name, m)
        elif isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d):
            if not m.track_running_stats or m.running_mean is None:
                raise QexpError(f"export: BatchNorm {name} has no running statistics")
            weight = m.weight if m.weight is not None else torch.ones_like(m.running_mean)
            bias = m.bias if m.bias is not None else torch.zeros_like(m.running_mean)
            self.add(
                node,
                "batchnorm",
                [x],
                module=name,
                eps=float(m.eps),
                mean=self.tensor(f"{name}.running_mean", m.running_mean),
                var=self.tensor(f"{name}.running_var", m.running_var),
                weight=self.tensor(f"{name}.weight", weight),
                bias=self.tensor(f"{name}.bias", bias),
            )
        elif isinstance(m, nn.ReLU):
            self.add(node, "clamp", [x], min=0.0, max=None)
        elif isinstance(m, nn.Hardtanh):  # ReLU6 included
            self.add(node, "clamp", [x], min=float(m.min_val), max=float(m.max_val))
        elif isinstance(m, nn.Hardswish | nn.Hardsigmoid):
            self.add(node, type(m).__name__.lower(), [x])
        elif isinstance(m, nn.MaxPool2d):
            if m.return_indices:
                raise QexpError(f"export: max pool {name} returns indices")
            self.add(
                node,
                "maxpool2d",
                [x],
                kernel=_ints(m.kernel_size),
                stride=_ints(m.stride),
                padding=_ints(m.padding),
                dilation=_ints(m.dilation),
                ceil_mode=bool(m.ceil_mode),
            )
        elif isinstance(m, nn.AvgPool2d):
            if m.divisor_override is not None:
                raise QexpError(f"export: avg pool {name} has a divisor override")
            self.add(
                node,
                "avgpool2d",
                [x],
                kernel=_ints(m.kernel_size),
                stride=_ints(m.stride),
                padding=_ints(m.padding),
                ceil_mode=bool(m.ceil_mode),
                count_include_pad=bool(m.count_include_pad),
            )
        elif isinstance(m, nn.AdaptiveAvgPool2d):
            self.add(node, "adaptive_avgpool2d", [x], output_size=_ints(m.output_size))
        elif isinstance(m, nn.Flatten):
            self.add(node, "flatten", [x], start_dim=int(m.start_dim), end_dim=int(m.end_dim))
        elif isinstance(m, nn.Dropout | nn.Identity):
            self.alias[node.name] = self.ref(x)
        else:
            raise QexpError(f"export: module {name} ({type(m).__name__}) is not supported")

    def function(self, node: fx.Node) -> None:
        fn, args, kw = node.target, node.args, node.kwargs
        if fn in (operator.add, torch.add, operator.mul, torch.mul) and len(args) == 2 and not kw:
            self.add(node, "add" if fn in (operator.add, torch.add) else "mul", list(args))
        elif fn is torch.flatten or (node.op == "call_method" and fn == "flatten"):
            start = int(args[1] if len(args) > 1 else kw.get("start_dim", 0))
            end = int(args[2] if len(args) > 2 else kw.get("end_dim", -1))
            self.add(node, "flatten", [args[0]], start_dim=start, end_dim=end)
        elif fn in (F.relu, torch.relu) or (node.op == "call_method" and fn == "relu"):
            self.add(node, "clamp", [args[0]], min=0.0, max=None)
        elif fn is F.adaptive_avg_pool2d:
            size = args[1] if len(args) > 1 else kw["output_size"]
            self.add(node, "adaptive_avgpool2d", [args[0]], output_size=_ints(size))
        else:
            what = fn if isinstance(fn, str) else getattr(fn, "__name__", repr(fn))
            raise QexpError(f"export: operation {what!r} ({node.op}) is not supported")


def quantize_like(x: Tensor, desc: dict[str, Any]) -> Tensor:
    """Values of ``x`` under an exported activation description (the verifier's map)."""
    if desc["kind"] == "sign":
        return torch.where(x >= 0, desc["scale"], -desc["scale"]).to(x.dtype)
    s, t = desc["scale"], desc["shift"]
    code = torch.clamp(torch.round(x / s + t), desc["qmin"], desc["qmax"])
    return (code - t) * s


def layer_inputs(net: nn.Module, batch: Tensor) -> dict[str, Tensor]:
    """The input of every quantized layer on ``batch`` (hard forward, eval mode)."""
    seen: dict[str, Tensor] = {}
    hooks = [
        m.register_forward_pre_hook(lambda _m, a, n=n: seen.__setitem__(n, a[0].detach()))
        for n, m in net.named_modules()
        if isinstance(m, QuantLayer)
    ]
    try:
        with torch.no_grad(), quant_mode(net, "hard"):
            net(batch)
    finally:
        for h in hooks:
            h.remove()
    return seen


def fold_batchnorm(builder: GraphBuilder) -> tuple[list[str], list[str], dict[str, str]]:
    """Fold BatchNorms into the per-channel affine of the quantized layer before them.

    A BatchNorm folds when its input is a quantized layer used only by it, or a max pool of
    such a layer whose folded scale is positive in every channel (max commutes with a positive
    scale, not a negative one). Returns the folded and the kept BatchNorm module names, and
    {removed node: the node that now stands for it}.
    """
    nodes = builder.nodes
    by_name = {n["name"]: n for n in nodes}
    users: dict[str, int] = {}
    for n in nodes:
        for i in n["inputs"]:
            users[i] = users.get(i, 0) + 1
    t = builder.tensors
    folded, kept, drop, renamed = [], [], set(), {}
    for bn in [n for n in nodes if n["op"] == "batchnorm"]:
        src = by_name.get(bn["inputs"][0])
        pool = None
        if src is not None and src["op"] == "maxpool2d" and users.get(src["name"]) == 1:
            pool, src = src, by_name.get(src["inputs"][0])
        g = t[bn["weight"]].astype(np.float64) / np.sqrt(
            t[bn["var"]].astype(np.float64) + bn["eps"]
        )
        ok = (
            src is not None
            and src["op"] in ("qconv", "qlinear")
            and src["bn_scale"] is None
            and users.get(src["name"]) == 1
            and (pool is None or bool(np.all(g > 0)))
        )
        if not ok:
            kept.append(bn["module"])
            continue
        bias = t[src["bias"]].astype(np.float64) if src["bias"] else 0.0
        shift = (bias - t[bn["mean"]]) * g + t[bn["bias"]]
        mod = src["module"]
        src["bn_scale"] = builder.tensor(f"{mod}.bn_scale", g.astype(np.float32))
        src["bias"] = builder.tensor(f"{mod}.bias", shift.astype(np.float32))
        for key in ("mean", "var", "weight", "bias"):
            t.pop(bn[key], None)
        drop.add(bn["name"])
        for n in nodes:  # the BatchNorm's users now read its input
            n["inputs"] = [bn["inputs"][0] if i == bn["name"] else i for i in n["inputs"]]
        renamed[bn["name"]] = bn["inputs"][0]
        folded.append(bn["module"])
    builder.nodes = [n for n in nodes if n["name"] not in drop]
    return folded, kept, renamed


#: module types of transformer graphs that the integer export format has no op for yet
_UNSUPPORTED = {nn.LayerNorm: "LayerNorm", nn.Embedding: "embeddings", nn.GELU: "GELU",
                QMatMul: "activation-activation products", nn.MultiheadAttention: "attention"}


def _unsupported_label(module: nn.Module) -> str | None:
    """What the export format cannot express in ``module``, or None."""
    if getattr(module, "quantizable_product", False):  # attention's float MatMul
        return "activation-activation products"
    return next((label for t, label in _UNSUPPORTED.items() if isinstance(module, t)), None)


def refuse_unsupported(net: nn.Module) -> None:
    """One line naming what the export format cannot express (transformer layers), before any
    work."""
    found = sorted({label for m in net.modules() if (label := _unsupported_label(m))})
    if found:
        raise QexpError(
            f"export: this network has {', '.join(found)}, which qexp's integer export does not "
            "cover yet (it handles CNN graphs: Conv2d/Linear, BatchNorm, ReLU-family, pooling); "
            "its trained weights are in the run's checkpoints/"
        )


def build_graph(
    net: nn.Module, batch: Tensor, fold_bn: bool = True
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The op graph (JSON-able) and tensors of ``net``'s deployed network.

    ``batch`` is a real input batch: it checks each exported input quantizer against the
    quantizer itself. Raises QexpError for layers or operations the format cannot express.
    """
    net.eval()
    refuse_unsupported(net)
    inputs = layer_inputs(net, batch)
    try:
        graph = _Tracer().trace(net)
    except Exception as exc:  # fx cannot follow data-dependent Python control flow
        msg = str(exc).strip().splitlines()[0][:120] if str(exc).strip() else type(exc).__name__
        raise QexpError(f"export: cannot trace the model into an op graph ({msg})") from None
    b = GraphBuilder(net, inputs)
    input_name, output_name = None, None
    for node in graph.nodes:
        if node.op == "placeholder":
            if input_name is not None:
                raise QexpError("export: the model takes more than one input")
            input_name = node.name
        elif node.op == "call_module":
            b.module(node, str(node.target), net.get_submodule(str(node.target)))
        elif node.op in ("call_function", "call_method"):
            b.function(node)
        elif node.op == "output":
            output_name = b.ref(node.args[0])
        else:
            raise QexpError(f"export: graph node {node.op} ({node.target}) is not supported")
    if fold_bn:
        folded, kept, renamed = fold_batchnorm(b)
        output_name = renamed.get(output_name, output_name)
    else:
        folded, kept = [], [n["module"] for n in b.nodes if n["op"] == "batchnorm"]
    meta = {
        "input": input_name,
        "output": output_name,
        "nodes": b.nodes,
        "batchnorm": {"folded": folded, "kept": kept},
    }
    return meta, b.tensors
