"""Quantized drop-in replacements for nn.Conv2d and nn.Linear.

Each layer quantizes its input activation and its weight. What the training forward does with
the quantizers is delegated to the run's estimator; evaluation always uses the hard grid, so the
reported accuracy is that of the truly quantized network.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qexp.quant.base import Quantizer
from qexp.quant.refs import keep_reference

#: How a quantized layer computes its forward.
#: - "auto": training -> the estimator's training forward; eval -> hard grid.
#: - "hard": hard grid for weights and activations (the deployed network).
#: - "soft": the estimator's training forward even in eval (to measure a stand-in's accuracy).
#: - "latent": latent full-precision weights, hard-quantized activations.
#: - "off": no quantization at all.
MODES = ("auto", "hard", "soft", "latent", "off")


class QuantLayer:
    """Mixin holding the quantizers, the estimator link and the forward mode of one layer."""

    w_quant: Quantizer | None
    a_quant: Quantizer | None
    weight: nn.Parameter
    #: the run's estimator (a qexp.estimators Estimator; body layers, None: straight-through), a
    #: reference owned by the QuantModel (set with :func:`~qexp.quant.refs.keep_reference`)
    estimator: nn.Module | None

    @classmethod
    def from_float(
        cls, layer: nn.Module, w_quant: Quantizer | None, a_quant: Quantizer | None, role: str
    ):
        """Wrap a float ``layer`` of the matching type, sharing its parameters (no copy).

        The quantized layer is built by its own constructor with ``layer``'s hyper-parameters
        on the meta device (no memory, no initialisation drawn from the global RNG, so a run's
        numbers do not depend on whether a layer was wrapped), then takes over ``layer``'s
        Parameter and buffer objects, its submodules, hooks and any attribute a model set on it.
        """
        q = cls(**cls._float_hparams(layer), device="meta")
        q._share_state(layer)
        q._setup_quant(w_quant, a_quant, role)
        return q

    @staticmethod
    def _float_hparams(layer: nn.Module) -> dict:
        """Constructor arguments that rebuild ``layer``'s shape (each subclass says which)."""
        raise NotImplementedError

    def _share_state(self, layer: nn.Module) -> None:
        """Make this (meta-built) layer use ``layer``'s tensors and state as its own."""
        self._parameters.clear()  # the meta placeholders
        for name, param in layer._parameters.items():
            self.register_parameter(name, param)
        for name, buf in layer._buffers.items():
            self.register_buffer(name, buf, name not in layer._non_persistent_buffers_set)
        for name, module in layer._modules.items():
            self.add_module(name, module)
        # Hooks, the training flag and attributes a model set on the layer (e.g. a tag read by
        # its forward): shared as they are, so wrapping changes nothing the model relies on.
        containers = {"_parameters", "_buffers", "_modules", "_non_persistent_buffers_set"}
        for name, value in vars(layer).items():
            if name not in containers:
                object.__setattr__(self, name, value)

    def _setup_quant(
        self, w_quant: Quantizer | None, a_quant: Quantizer | None, role: str = "body"
    ) -> None:
        self.w_quant = w_quant
        self.a_quant = a_quant
        if w_quant is not None:  # learned per-channel parameters are sized from the weight
            w_quant.bind_weight(self.weight)  # now, before the optimizer collects them
        #: "first", "last" or "body": edge layers keep their own bits and plain STE.
        self.layer_role = role
        self.mode = "auto"
        keep_reference(self, "estimator", None)

    @property
    def w_bits(self) -> int:
        return self.w_quant.bits if self.w_quant is not None else 32

    @property
    def a_bits(self) -> int:
        return self.a_quant.bits if self.a_quant is not None else 32

    def _uses_estimator(self) -> bool:
        mode = self.mode
        return (mode == "auto" and self.training) or mode == "soft"

    def quant_weight(self) -> Tensor:
        """The weight this forward computes with."""
        w = self.weight
        if self.w_quant is None or self.mode in ("off", "latent"):
            return w
        if self.training and self.w_quant.observing:
            self.w_quant.observe(w)
        if self._uses_estimator():
            est = self.estimator
            return est.weight(self, w) if est is not None else self.w_quant(w)
        return self.deployed_weight()

    def deployed_weight(self) -> Tensor:
        """The weight of the deployed (hard) network.

        Body layers ask their estimator (``deploy_weight``, by default the quantizer's hard
        grid), so methods whose hard weights are not ``w_quant.hard(w)`` stay honest; edge
        layers use the quantizer's hard grid.
        """
        w = self.weight
        if self.w_quant is None:
            return w
        est = self.estimator
        return est.deploy_weight(self, w) if est is not None else self.w_quant.hard(w)

    def quant_input(self, x: Tensor) -> Tensor:
        """The input activation this forward computes with."""
        if self.a_quant is None or self.mode == "off":
            return x
        if self._uses_estimator():
            if self.training and self.a_quant.observing:
                self.a_quant.observe(x)
            est = self.estimator
            return est.activation(self, x) if est is not None else self.a_quant(x)
        return self.a_quant.hard(x)


class QConv2d(QuantLayer, nn.Conv2d):
    """nn.Conv2d with quantized weight and input."""

    @staticmethod
    def _float_hparams(layer: nn.Module) -> dict:
        return {
            "in_channels": layer.in_channels,
            "out_channels": layer.out_channels,
            "kernel_size": layer.kernel_size,
            "stride": layer.stride,
            "padding": layer.padding,
            "dilation": layer.dilation,
            "groups": layer.groups,
            "bias": layer.bias is not None,
            "padding_mode": layer.padding_mode,
        }

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(self.quant_input(x), self.quant_weight(), self.bias)


class QLinear(QuantLayer, nn.Linear):
    """nn.Linear with quantized weight and input."""

    @staticmethod
    def _float_hparams(layer: nn.Module) -> dict:
        return {
            "in_features": layer.in_features,
            "out_features": layer.out_features,
            "bias": layer.bias is not None,
        }

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(self.quant_input(x), self.quant_weight(), self.bias)


class QEmbedding(QuantLayer, nn.Embedding):
    """nn.Embedding with a quantized table (an edge layer: its own bits, plain STE).

    Its input is token ids, so it has no input quantizer; it computes no multiply-accumulates
    (a lookup), and its table counts in the weight size at its bits.
    """

    @staticmethod
    def _float_hparams(layer: nn.Module) -> dict:
        return {
            "num_embeddings": layer.num_embeddings,
            "embedding_dim": layer.embedding_dim,
            "padding_idx": layer.padding_idx,
            "max_norm": layer.max_norm,
            "norm_type": layer.norm_type,
            "scale_grad_by_freq": layer.scale_grad_by_freq,
            "sparse": layer.sparse,
        }

    def forward(self, x: Tensor) -> Tensor:
        return F.embedding(x, self.quant_weight(), self.padding_idx, self.max_norm,
                           self.norm_type, self.scale_grad_by_freq, self.sparse)  # fmt: skip


class QMatMul(nn.Module):
    """``a @ b`` of two activations (attention's ``q k^T`` and ``softmax @ v``), both inputs
    quantized with per-token absmax grids (one scale per row of ``a``, per column of ``b``):
    straight-through in training, the hard grid in evaluation and in the "hard",
    "latent" and "soft" modes (there is no weight to keep latent), float in "off".

    The operand quantizers are not trained by the run's estimator: the estimators under study
    act on weights and layer inputs, and the products follow them on a fixed grid (as the edge
    layers do).
    """

    def __init__(self, a_quant: Quantizer, b_quant: Quantizer) -> None:
        super().__init__()
        self.a_quant = a_quant
        self.b_quant = b_quant
        self.mode = "auto"

    @property
    def a_bits(self) -> int:
        return self.a_quant.bits

    def quant_operand(self, q: Quantizer, x: Tensor) -> Tensor:
        """One operand as this forward computes with it."""
        if self.mode == "off":
            return x
        if self.training and self.mode in ("auto", "soft"):
            return q(x)  # straight-through
        return q.hard(x)

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        # a per-token quantizer scales along the last dim: each row of ``a`` and each column
        # of ``b`` (b is quantized transposed), so every scale is constant along the reduced
        # dim and the product is an integer matmul times an outer product of scales
        bq = self.quant_operand(self.b_quant, b.transpose(-2, -1)).transpose(-2, -1)
        return torch.matmul(self.quant_operand(self.a_quant, a), bq)


def quant_matmuls(model: nn.Module) -> list[tuple[str, QMatMul]]:
    """All quantized activation-activation products of ``model``, in registration order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, QMatMul)]


def quant_layers(model: nn.Module) -> list[tuple[str, QuantLayer]]:
    """All quantized layers of ``model`` with their names, in registration order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, QuantLayer)]


def refresh_weight_ranges(model: nn.Module, step: int) -> None:
    """After optimizer step ``step``: every weight quantizer updates what it derives from its
    layer's weight (e.g. the uniform quantizer's periodic MSE range search)."""
    for _, layer in quant_layers(model):
        if layer.w_quant is not None:
            layer.w_quant.refresh(layer.weight, step)


@contextmanager
def quant_mode(model: nn.Module, mode: str):
    """Temporarily set every quantized layer of ``model`` to ``mode`` (see MODES)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    layers = [m for _, m in (*quant_layers(model), *quant_matmuls(model))]
    saved = [m.mode for m in layers]
    for m in layers:
        m.mode = mode
    try:
        yield model
    finally:
        for m, s in zip(layers, saved, strict=True):
            m.mode = s
