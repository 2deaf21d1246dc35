"""ONNX with QuantizeLinear / DequantizeLinear (QDQ) around every quantized Conv / Gemm.

Built from the exported file itself (never from qexp's model classes), opset 21:

- weights are constant integer initializers followed by a per-channel DequantizeLinear; the
  integers are ``k + offset`` of the layer's grid (doubled, with half the scale, where the grid
  sits at half steps, e.g. the symmetric grids without a zero level: 2 bits -> -3, -1, 1, 3);
- every layer input passes Clip -> QuantizeLinear -> DequantizeLinear onto the layer's grid
  (grids at half steps are shifted by half a step around the pair; binary inputs pass
  ``Where(x >= 0, s, -s)`` first);
- the container type is the smallest of int4 / uint4 / int8 / uint8 / int16 / uint16 holding
  the grid's integers. ONNX has no 2- or 3-bit types: those grids live in int4 / uint4 and use
  only 4 or 8 of the 16 values (the Clip before QuantizeLinear keeps activations on them);
- the per-channel affine after the Conv / Gemm (folded BatchNorm, bias) is a Mul and an Add.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from qexp.errors import QexpError
from qexp.export.engine import _half_step, integer_weight

OPSET = 21


def _container(lo: int, hi: int) -> tuple[int, Any]:
    """Smallest ONNX integer type holding [lo, hi]: (TensorProto type, numpy dtype)."""
    from onnx import TensorProto

    for tp, dtype, a, b in (
        (TensorProto.UINT4, np.uint8, 0, 15),
        (TensorProto.INT4, np.int8, -8, 7),
        (TensorProto.UINT8, np.uint8, 0, 255),
        (TensorProto.INT8, np.int8, -128, 127),
        (TensorProto.UINT16, np.uint16, 0, 65535),
        (TensorProto.INT16, np.int16, -32768, 32767),
    ):
        if a <= lo and hi <= b:
            return tp, dtype
    raise QexpError(f"export: integers {lo}..{hi} fit no ONNX QDQ type")


class _Builder:
    def __init__(self) -> None:
        self.nodes: list[Any] = []
        self.inits: list[Any] = []
        self.count = 0

    def const(self, name: str, value: Any, tp: int | None = None) -> str:
        from onnx import TensorProto, helper

        arr = np.asarray(value)
        if tp is None:
            tp = TensorProto.FLOAT
            arr = arr.astype(np.float32)
        self.inits.append(helper.make_tensor(name, tp, list(arr.shape), arr.reshape(-1).tolist()))
        return name

    def op(self, kind: str, inputs: list[str], out: str | None = None, **attrs: Any) -> str:
        from onnx import helper

        self.count += 1
        out = out or f"{kind.lower()}_{self.count}"
        self.nodes.append(helper.make_node(kind, inputs, [out], name=out, **attrs))
        return out

    # -- quantized layers ----------------------------------------------------------------------
    def act_qdq(self, x: str, act: dict[str, Any], p: str) -> str:
        if act["kind"] == "sign":
            s = act["scale"]
            ge = self.op("GreaterOrEqual", [x, self.const(f"{p}.zero", 0.0)])
            x = self.op("Where", [ge, self.const(f"{p}.pos", s), self.const(f"{p}.neg", -s)])
            tp, dtype = _container(-1, 1)
            zp = self.const(f"{p}.a_zp", np.zeros((), dtype), tp)
            q = self.op("QuantizeLinear", [x, self.const(f"{p}.a_scale", s), zp])
            return self.op("DequantizeLinear", [q, f"{p}.a_scale", zp])
        s, t, lo, hi = act["scale"], act["shift"], act["qmin"], act["qmax"]
        half = _half_step(t)
        # codes round(x / s + t): an integer t is the zero point, a half-integer one a shift
        zp_value = 0 if half else int(round(t))
        shift = t * s if half else 0.0
        if half:
            x = self.op("Add", [x, self.const(f"{p}.a_shift", shift)])
        low, high = (lo - zp_value) * s, (hi - zp_value) * s
        x = self.op("Clip", [x, self.const(f"{p}.a_lo", low), self.const(f"{p}.a_hi", high)])
        tp, dtype = _container(lo, hi)
        zp = self.const(f"{p}.a_zp", np.array(zp_value, dtype), tp)
        q = self.op("QuantizeLinear", [x, self.const(f"{p}.a_scale", s), zp])
        y = self.op("DequantizeLinear", [q, f"{p}.a_scale", zp])
        if half:
            y = self.op("Sub", [y, f"{p}.a_shift"])
        return y

    def weight(self, node: dict[str, Any], tensors: dict[str, np.ndarray], p: str) -> str:
        w = node["weight"]
        if "float" in w:
            return self.const(f"{p}.weight", tensors[w["float"]])
        ints, unit = integer_weight(w, tensors)
        ints_np = ints.numpy().astype(np.int64)
        mult = 2 if _half_step(w["offset"]) else 1
        lo = int(round(mult * w["offset"]))
        tp, dtype = _container(lo, lo + mult * (w["levels"] - 1))
        wq = self.const(f"{p}.w_int", ints_np.astype(dtype), tp)
        scale = unit.numpy().astype(np.float32)
        if scale.size == 1:
            zp = self.const(f"{p}.w_zp", np.zeros((), dtype), tp)
            return self.op("DequantizeLinear", [wq, self.const(f"{p}.w_scale", scale[0]), zp])
        zp = self.const(f"{p}.w_zp", np.zeros(scale.shape, dtype), tp)
        sc = self.const(f"{p}.w_scale", scale)
        return self.op("DequantizeLinear", [wq, sc, zp], axis=0)

    def quant_layer(self, node: dict[str, Any], x: str, tensors: dict[str, np.ndarray]) -> str:
        p = node["module"]
        if node.get("act") is not None:
            x = self.act_qdq(x, node["act"], p)
        w = self.weight(node, tensors, p)
        if node["op"] == "qconv":
            ph, pw = node["padding"]
            y = self.op(
                "Conv",
                [x, w],
                strides=node["stride"],
                pads=[ph, pw, ph, pw],
                dilations=node["dilation"],
                group=node["groups"],
            )
            shape = (1, -1, 1, 1)
        else:
            y = self.op("Gemm", [x, w], transB=1)
            shape = (1, -1)
        if node.get("bn_scale"):
            y = self.op("Mul", [y, self.const(f"{p}.bn", tensors[node["bn_scale"]].reshape(shape))])
        if node.get("bias"):
            y = self.op("Add", [y, self.const(f"{p}.b", tensors[node["bias"]].reshape(shape))])
        return y

    # -- the rest --------------------------------------------------------------------------------
    def float_op(self, node: dict[str, Any], xs: list[str], tensors: dict[str, np.ndarray]) -> str:
        op, x, n = node["op"], xs[0], node["name"]
        if op == "batchnorm":
            ins = [x] + [
                self.const(f"{n}.{k}", tensors[node[k]]) for k in ("weight", "bias", "mean", "var")
            ]
            return self.op("BatchNormalization", ins, epsilon=node["eps"])
        if op == "clamp":
            if node["min"] == 0.0 and node["max"] is None:
                return self.op("Relu", [x])
            lo = self.const(f"{n}.lo", node["min"] if node["min"] is not None else -np.inf)
            hi = self.const(f"{n}.hi", node["max"] if node["max"] is not None else np.inf)
            return self.op("Clip", [x, lo, hi])
        if op == "hardswish":
            return self.op("HardSwish", [x])
        if op == "hardsigmoid":
            return self.op("HardSigmoid", [x], alpha=1.0 / 6, beta=0.5)
        if op in ("maxpool2d", "avgpool2d"):
            ph, pw = node["padding"]
            attrs: dict[str, Any] = {
                "kernel_shape": node["kernel"],
                "strides": node["stride"],
                "pads": [ph, pw, ph, pw],
                "ceil_mode": int(node["ceil_mode"]),
            }
            if op == "maxpool2d":
                return self.op("MaxPool", [x], dilations=node["dilation"], **attrs)
            return self.op(
                "AveragePool", [x], count_include_pad=int(node["count_include_pad"]), **attrs
            )
        if op == "adaptive_avgpool2d" and list(node["output_size"]) == [1, 1]:
            return self.op("GlobalAveragePool", [x])
        if op == "flatten" and node["start_dim"] == 1 and node["end_dim"] == -1:
            return self.op("Flatten", [x], axis=1)
        if op in ("add", "mul"):
            return self.op(op.capitalize(), xs)
        raise QexpError(f"export: op {op} ({node}) has no ONNX translation here")


def onnx_bytes(meta: dict[str, Any], tensors: dict[str, np.ndarray]) -> bytes:
    """The ONNX model (serialized) of an exported network (``meta`` and packed ``tensors``)."""
    try:
        import onnx
        from onnx import TensorProto, helper
    except ImportError:
        raise QexpError("--onnx needs the onnx package: pip install 'qexp[export]'") from None
    graph = meta["graph"]
    b = _Builder()
    names = {graph["input"]: "input"}
    for node in graph["nodes"]:
        xs = [names[i] for i in node["inputs"]]
        if node["op"] in ("qconv", "qlinear"):
            names[node["name"]] = b.quant_layer(node, xs[0], tensors)
        else:
            names[node["name"]] = b.float_op(node, xs, tensors)
    b.op("Identity", [names[graph["output"]]], out="logits")
    c, h, w = meta["input_shape"]
    inp = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", c, h, w])
    out = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", meta["num_classes"]])
    g = helper.make_graph(b.nodes, "qexp_export", [inp], [out], initializer=b.inits)
    model = helper.make_model(
        g, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="qexp"
    )
    model.ir_version = 10  # opset 21 needs IR 10; newer IR versions trip older onnxruntimes
    onnx.checker.check_model(model)
    return model.SerializeToString()
