"""Integer inference over an exported op graph, without qexp's training modules.

Each quantized layer runs as deployed hardware would:

1. its input is rounded onto the layer's activation grid, ``code = clamp(round(x / scale +
   shift), qmin, qmax)``, and turned into the integer ``code - shift`` (doubled where the grid
   sits at half steps, e.g. symmetric grids without a zero level, with half the scale);
2. the weight codes are unpacked into integers ``k + offset`` (doubled likewise);
3. products are summed into an int32 accumulator: exactly, in float64 (which holds integers
   below 2^53 exactly; the bound ``K * max|w| * max|a| < 2^31`` is checked, so the result is
   the int32 sum), or, for binary layers (weights +-1 and inputs sign(x)), by XNOR + popcount on
   bit-packed signs;
4. one per-channel affine turns the accumulator into the output: ``acc * (w_scale * a_scale *
   bn_scale) + bias`` (bn_scale and bias hold a folded BatchNorm).

Between quantized layers the remaining ops (ReLU / hardtanh clamps, pooling, residual adds, kept
BatchNorms) run in float32, and the next layer's step 1 requantizes onto its own grid.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from qexp.bitops import pack_bits, xnor_conv2d_dots, xnor_dot
from qexp.errors import QexpError
from qexp.export.pack import unpack_codes

_INT32_MAX = 2**31 - 1


def _half_step(offset: float) -> bool:
    """Whether a grid offset sits at half steps (its integers are then doubled)."""
    return abs(offset - round(offset)) > 1e-9


def integer_weight(w: dict[str, Any], tensors: dict[str, np.ndarray]) -> tuple[Tensor, Tensor]:
    """(integer weights as float64, per-channel scale of one integer unit as float64)."""
    codes = unpack_codes(tensors[w["codes"]], w["bits"], w["count"])
    if codes.size != int(np.prod(w["shape"])) or codes.max(initial=0) >= w["levels"]:
        raise QexpError("export file: weight codes do not fit their layer's shape or levels")
    mult = 2 if _half_step(w["offset"]) else 1
    ints = mult * codes + int(round(mult * w["offset"]))
    scale = torch.from_numpy(tensors[w["scale"]].astype(np.float64)) / mult
    return torch.from_numpy(ints.reshape(w["shape"]).astype(np.float64)), scale


def quantize_input(x: Tensor, act: dict[str, Any]) -> tuple[Tensor, float]:
    """(integer input as float64, value of one integer unit) for a ``grid`` activation."""
    s, t = act["scale"], act["shift"]
    code = torch.clamp(torch.round(x / s + t), act["qmin"], act["qmax"]).double()
    mult = 2 if _half_step(t) else 1
    return mult * code - round(mult * t), s / mult


class QuantOp:
    """One quantized Conv2d / Linear with its integer weights and per-channel affine."""

    def __init__(self, node: dict[str, Any], tensors: dict[str, np.ndarray]) -> None:
        self.node, self.conv = node, node["op"] == "qconv"
        w = node["weight"]
        if "float" in w:
            self.w_float = torch.from_numpy(tensors[w["float"]].astype(np.float32))
            self.w_int = self.w_unit = None
        else:
            self.w_int, self.w_unit = integer_weight(w, tensors)
            unit = self.w_unit.reshape((-1,) + (1,) * (self.w_int.dim() - 1))
            self.w_float = None
            self.w_dequant = (self.w_int * unit).float()  # for a full-precision input
        n_out = (self.w_float if self.w_float is not None else self.w_int).shape[0]
        self.bn = self._vector(node.get("bn_scale"), tensors, n_out, 1.0)
        self.bias = self._vector(node.get("bias"), tensors, n_out, 0.0)
        act = node.get("act")
        self.binary = (
            act is not None
            and act["kind"] == "sign"
            and w.get("bits") == 1
            and (not self.conv or node["groups"] == 1)
        )

    @staticmethod
    def _vector(name: str | None, tensors: dict[str, np.ndarray], n: int, fill: float) -> Tensor:
        if name is None:
            return torch.full((n,), fill, dtype=torch.float64)
        return torch.from_numpy(tensors[name].astype(np.float64)).reshape(-1)

    def _linear(self, x: Tensor, w: Tensor) -> Tensor:
        if not self.conv:
            return F.linear(x, w)
        n = self.node
        return F.conv2d(x, w, None, n["stride"], n["padding"], n["dilation"], n["groups"])

    def _shape(self, v: Tensor, like: Tensor) -> Tensor:
        return v.reshape((1, -1) + (1,) * (like.dim() - 2))

    def __call__(self, x: Tensor) -> Tensor:
        act = self.node.get("act")
        if self.w_float is not None or act is None:
            # a full-precision weight or input: no integer path, float32 as in the trained net
            w = self.w_float if self.w_float is not None else self.w_dequant
            xq = x if act is None else _dequantized_input(x, act)
            y = self._linear(xq, w).double()
            return (y * self._shape(self.bn, y) + self._shape(self.bias, y)).float()
        if self.binary:
            acc = self._xnor(x)
            a_unit = act["scale"]
        else:
            if act["kind"] == "sign":
                a_int, a_unit = torch.where(x >= 0, 1.0, -1.0).double(), act["scale"]
            else:
                a_int, a_unit = quantize_input(x, act)
            bound = self.w_int[0].numel() * float(self.w_int.abs().max()) * float(a_int.abs().max())
            if bound > _INT32_MAX:
                raise QexpError(f"layer {self.node['module']}: the accumulator could exceed int32")
            acc = self._linear(a_int, self.w_int).to(torch.int32)
        mul = self.w_unit * a_unit * self.bn
        return (acc.double() * self._shape(mul, acc) + self._shape(self.bias, acc)).float()

    def _xnor(self, x: Tensor) -> Tensor:
        """Integer +-1 dot products of sign(x) and the weight signs by XNOR + popcount."""
        w_signs = self.w_int > 0
        if self.conv:
            n = self.node
            return xnor_conv2d_dots(x >= 0, w_signs, n["stride"], n["padding"], n["dilation"])
        return xnor_dot(pack_bits(x >= 0), pack_bits(w_signs), x.shape[-1])


def _dequantized_input(x: Tensor, act: dict[str, Any]) -> Tensor:
    if act["kind"] == "sign":
        return torch.where(x >= 0, act["scale"], -act["scale"]).to(x.dtype)
    a_int, unit = quantize_input(x, act)
    return (a_int * unit).float()


def _float_op(node: dict[str, Any], args: list[Tensor], tensors: dict[str, Tensor]) -> Tensor:
    op, x = node["op"], args[0]
    if op == "batchnorm":
        return F.batch_norm(
            x,
            tensors[node["mean"]],
            tensors[node["var"]],
            tensors[node["weight"]],
            tensors[node["bias"]],
            False,
            0.0,
            node["eps"],
        )
    if op == "clamp":
        return torch.clamp(x, node["min"], node["max"])
    if op == "hardswish":
        return F.hardswish(x)
    if op == "hardsigmoid":
        return F.hardsigmoid(x)
    if op == "maxpool2d":
        return F.max_pool2d(
            x,
            node["kernel"],
            node["stride"],
            node["padding"],
            node["dilation"],
            ceil_mode=node["ceil_mode"],
        )
    if op == "avgpool2d":
        return F.avg_pool2d(
            x,
            node["kernel"],
            node["stride"],
            node["padding"],
            node["ceil_mode"],
            node["count_include_pad"],
        )
    if op == "adaptive_avgpool2d":
        return F.adaptive_avg_pool2d(x, node["output_size"])
    if op == "flatten":
        return torch.flatten(x, node["start_dim"], node["end_dim"])
    if op == "add":
        return args[0] + args[1]
    if op == "mul":
        return args[0] * args[1]
    raise QexpError(f"export file: unknown op {op!r} (made by a newer qexp?)")


class Engine:
    """Runs an exported network: ``Engine(meta, tensors)(x)`` gives the logits of ``x``."""

    def __init__(self, meta: dict[str, Any], tensors: dict[str, np.ndarray]) -> None:
        graph = meta["graph"]
        self.input, self.output, self.nodes = graph["input"], graph["output"], graph["nodes"]
        self.quant = {
            n["name"]: QuantOp(n, tensors) for n in self.nodes if n["op"] in ("qconv", "qlinear")
        }
        self.floats = {
            k: torch.from_numpy(v.astype(np.float32))
            for k, v in tensors.items()
            if v.dtype != np.uint8
        }

    @torch.no_grad()
    def __call__(self, x: Tensor) -> Tensor:
        values: dict[str, Tensor] = {self.input: x.float()}
        for node in self.nodes:
            args = [values[i] for i in node["inputs"]]
            if node["name"] in self.quant:
                values[node["name"]] = self.quant[node["name"]](args[0])
            else:
                values[node["name"]] = _float_op(node, args, self.floats)
        return values[self.output]
