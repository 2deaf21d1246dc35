"""Quantizers (forward maps onto grids), quantized layers and the model wrapper."""

from qexp.quant.base import Grid, Quantizer, round_ste
from qexp.quant.binary import BinaryQuantizer
from qexp.quant.layers import QConv2d, QLinear, QuantLayer, quant_layers, quant_mode
from qexp.quant.uniform import UniformQuantizer
from qexp.quant.wrap import LayerBits, attach_estimator, quantize_model

__all__ = [
    "BinaryQuantizer",
    "Grid",
    "LayerBits",
    "QConv2d",
    "QLinear",
    "QuantLayer",
    "Quantizer",
    "UniformQuantizer",
    "attach_estimator",
    "quant_layers",
    "quant_mode",
    "quantize_model",
    "round_ste",
]
