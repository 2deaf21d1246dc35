"""QuantNet-style meta quantizer (after Liu et al. 2020, arXiv 2009.04626; qexp's own design).

The paper's architecture and losses were not readable, so this is qexp's "QuantNet-style"
version of its idea: a small differentiable sub-network maps each full-precision weight to its
(soft) quantized value, is trained jointly with the task network, and no straight-through
estimator is used anywhere in the weight path.

Per quantized body layer with latent weight ``w``:

- ``w_norm = w / std(w)`` (one std per layer);
- the meta net ``g`` is an MLP applied elementwise: ``g(x) = x + mlp([x, e])`` with a residual
  (so training starts from the hard quantizer's own decision) and an optional learned per-layer
  embedding ``e``; one meta net for all layers (``share``) or one per layer;
- 1 bit: ``b~ = tanh(gamma * g(w_norm))`` and the training weight is ``scale * b~`` with
  ``scale = mean|w|`` (per output channel or per tensor);
- k bits: a soft staircase onto the ``2^k`` levels of the layer's weight quantizer grid (see
  :func:`soft_staircase`);
- the loss gains ``reg_weight * mean(1 - b~^2)`` (k bits: the staircase's normalized slope), which
  pulls outputs onto the levels; ``gamma`` grows during training (``schedule.gamma``).

Deployment uses the hard decisions of the meta net (``scale * sign(b~)`` at 1 bit, the nearest
grid level of the meta output at k bits), not ``sign(w)``, so the deployed network is the one the
soft network converged to; the gap between the two is logged as ``soft_hard_gap``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from qexp.curves import Curve, reaches
from qexp.errors import QexpError
from qexp.estimators.base import Criterion, Estimator, EstimatorContext, LogValues
from qexp.estimators.compat import grid_input, refuse_without_grid
from qexp.quant.base import Grid, Quantizer
from qexp.quant.layers import QuantLayer


def soft_staircase(z: Tensor, num_levels: int, gamma: Tensor | float) -> Tensor:
    """Smooth staircase of ``z`` onto ``num_levels`` evenly spaced levels in [-1, 1].

    The levels are ``-1 + 2k / (n - 1)``; one tanh step sits at each midpoint ``m_j`` between
    neighbouring levels, with a sharpness of ``gamma`` per half level spacing:
    ``-1 + sum_j (1 + tanh(gamma * (n - 1) * (z - m_j))) / (n - 1)``. For two levels this is
    ``tanh(gamma * z)``; as gamma grows it tends to the nearest level (see :func:`hard_level`).
    """
    n = num_levels
    if n == 2:
        return torch.tanh(gamma * z)
    mids = _midpoints(n, z)
    steps = torch.tanh(gamma * (n - 1) * (z.unsqueeze(-1) - mids))
    return -1.0 + (1.0 + steps).sum(dim=-1) / (n - 1)


def staircase_slope(z: Tensor, num_levels: int, gamma: Tensor | float) -> Tensor:
    """Slope of :func:`soft_staircase` relative to its peak: ``sum_j sech^2`` over the steps.

    Equal to ``1 - b~^2`` for two levels; near 0 on a level and near 1 between two levels.
    """
    n = num_levels
    if n == 2:
        return 1.0 - torch.tanh(gamma * z).pow(2)
    mids = _midpoints(n, z)
    return (1.0 - torch.tanh(gamma * (n - 1) * (z.unsqueeze(-1) - mids)).pow(2)).sum(dim=-1)


def hard_level(z: Tensor, num_levels: int) -> Tensor:
    """Integer index (0 .. n-1) of the level :func:`soft_staircase` tends to as gamma grows."""
    n = num_levels
    if n == 2:
        return (z >= 0).to(z.dtype)
    return torch.clamp(torch.round((z + 1.0) * (n - 1) / 2), 0, n - 1)


def _midpoints(n: int, like: Tensor) -> Tensor:
    j = torch.arange(1, n, device=like.device, dtype=like.dtype)
    return -1.0 + (2 * j - 1) / (n - 1)


class QuantNet(Estimator):
    """QuantNet-style meta quantizer for weights; activations use the straight-through estimator.

    Args:
        gamma: sharpness of the output tanh / staircase, a curve of training progress
            (``${schedule.gamma}``) or a constant.
        hidden: hidden units of the meta MLP.
        share: one meta net for every layer (True) or one per layer (False).
        embed_dim: size of a learned per-layer embedding fed to the meta net with each weight
            (0 = none).
        residual: ``g(x) = x + mlp(x)`` with the output layer initialised at zero, so training
            starts from the plain quantizer's decision (``sign(w)`` at 1 bit); False:
            ``g = mlp`` from a random start.
        per_channel: 1-bit scale ``mean|w|`` per output channel (False: per tensor).
        reg_weight: weight lambda of the regularizer ``mean(1 - b~^2)``.
        meta_lr: learning rate of the meta net's parameters (null = the run's LR); no weight
            decay.
    """

    has_soft_forward = True

    def __init__(
        self,
        gamma: Curve | float = 1.0,
        hidden: int = 16,
        share: bool = True,
        embed_dim: int = 0,
        residual: bool = True,
        per_channel: bool = True,
        reg_weight: float = 1e-3,
        meta_lr: float | None = None,
    ) -> None:
        super().__init__()
        if int(hidden) < 1:
            raise QexpError(f"estimator.hidden must be a positive integer, got {hidden}")
        if int(embed_dim) < 0:
            raise QexpError(f"estimator.embed_dim must be >= 0, got {embed_dim}")
        if reg_weight < 0:
            raise QexpError(f"estimator.reg_weight must be >= 0, got {reg_weight}")
        if meta_lr is not None and meta_lr <= 0:
            raise QexpError(f"estimator.meta_lr must be null or positive, got {meta_lr}")
        self.gamma_curve = gamma if callable(gamma) else None
        self.hidden = int(hidden)
        self.share = bool(share)
        self.embed_dim = int(embed_dim)
        self.residual = bool(residual)
        self.per_channel = bool(per_channel)
        self.reg_weight = float(reg_weight)
        self.meta_lr = meta_lr
        # A buffer, so a checkpoint restores the sharpness its soft network was trained at.
        self.register_buffer("gamma", torch.tensor(float(gamma) if not callable(gamma) else 1.0))
        # regularizer terms of the current loss() forward: (sum, count) per layer call
        self._reg_terms: list[tuple[Tensor, int]] | None = None
        #: position of each body layer (by id) among the meta nets, filled by ``attach``
        self.layer_index: dict[int, int] = {}

    # -- wiring ------------------------------------------------------------------------------
    def attach(self, model: nn.Module, ctx: EstimatorContext) -> None:
        """Create the meta net(s) for the model's quantized body layers."""
        super().attach(model, ctx)
        # Layers are found by role, not by ``layer.estimator is self``: a wrapping estimator
        # (block replacement) may own the layers and delegate their weights to this one.
        layers = [
            m
            for m in model.modules()
            if isinstance(m, QuantLayer) and m.layer_role == "body" and m.w_quant is not None
        ]
        self.layer_index = {id(m): i for i, m in enumerate(layers)}
        nets = 1 if self.share else max(len(layers), 1)
        h, e = self.hidden, self.embed_dim
        # Input weights ~ N(0, 1): the input w_norm has unit std, so hidden units start spread
        # over tanh's working range; biases spread the units' centres over [-2, 2].
        self.w_in = nn.Parameter(torch.randn(nets, h))
        self.b_in = nn.Parameter(torch.empty(nets, h).uniform_(-2.0, 2.0))
        out_std = 0.0 if self.residual else 1.0 / math.sqrt(h)
        self.w_out = nn.Parameter(torch.randn(nets, h) * out_std)
        self.b_out = nn.Parameter(torch.zeros(nets))
        if e > 0:
            self.embedding = nn.Parameter(torch.randn(max(len(layers), 1), e) / math.sqrt(e))
            self.w_embed = nn.Parameter(torch.randn(nets, h, e) / math.sqrt(e))
        else:
            self.embedding = None
            self.w_embed = None

    # -- the meta net ----------------------------------------------------------------------------
    def meta(self, layer: QuantLayer, x: Tensor) -> Tensor:
        """``g(x)`` of ``layer``'s meta net, elementwise on the normalized weights ``x``."""
        i = self.layer_index.get(id(layer))
        if i is None:
            raise RuntimeError("QuantNet.meta: layer was not seen by attach()")
        k = 0 if self.share else i
        bias = self.b_in[k]
        if self.embedding is not None:
            # The embedding enters the first layer linearly, i.e. as a per-layer bias shift.
            bias = bias + self.w_embed[k] @ self.embedding[i]
        hid = torch.tanh(x.unsqueeze(-1) * self.w_in[k] + bias)
        out = hid @ self.w_out[k] + self.b_out[k]
        return x + out if self.residual else out

    def _layer_terms(self, layer: QuantLayer, w: Tensor) -> tuple[Tensor, Tensor, Tensor, int]:
        """(z, center, half_span, num_levels): z lives on the normalized grid [-1, 1] whose
        ends map to ``center -+ half_span`` in weight units (k bits: in the units of the
        tensor the grid applies to, ``grid_input``; the raw weight for most quantizers)."""
        if layer.w_bits == 1:
            std = w.std().clamp(min=1e-8)
            g = self.meta(layer, w / std)
            if self.per_channel:
                scale = w.abs().reshape(w.shape[0], -1).mean(dim=1)
                scale = scale.reshape((-1,) + (1,) * (w.dim() - 1))
            else:
                scale = w.abs().mean()
            return g, torch.zeros_like(scale), scale, 2
        v = grid_input(layer.w_quant, w)  # e.g. tanh(w) / max|tanh(w)| for DoReFa weights
        std = v.std().clamp(min=1e-8)
        g = self.meta(layer, v / std)
        grid: Grid = layer.w_quant.grid(w)
        n = grid.num_levels
        half_span = grid.step * (n - 1) / 2
        center = grid.step * (grid.offset + (n - 1) / 2)
        # g is in units of the layer's std; rescale it onto the normalized grid, so that at the
        # residual start the staircase sends each weight to its nearest grid level.
        z = (g * std - center) / half_span
        return z, center, half_span, n

    # -- per-layer training forward --------------------------------------------------------------
    def weight(self, layer: QuantLayer, w: Tensor) -> Tensor:
        """``center + half_span * b~``: gradients reach w and the meta net through autograd."""
        z, center, half_span, n = self._layer_terms(layer, w)
        gamma = self.gamma  # a tensor: no device sync per layer
        b = soft_staircase(z, n, gamma)
        if self._reg_terms is not None:
            self._reg_terms.append((staircase_slope(z, n, gamma).sum(), z.numel()))
        return center + half_span * b

    @torch.no_grad()
    def deploy_weight(self, layer: QuantLayer, w: Tensor) -> Tensor:
        """The meta net's hard decision: ``scale * sign(b~)`` at 1 bit, else its grid level."""
        z, center, half_span, n = self._layer_terms(layer, w)
        k = hard_level(z, n)
        # level k of n in weight units, written so equal k give bit-identical values
        return center + half_span * (2 * k / (n - 1) - 1)

    def check_quantizer(self, role: str, quant: Quantizer) -> None:
        """k-bit weights follow the quantizer's uniform grid (1 bit only needs mean|w|)."""
        if role == "weight" and quant.bits > 1:
            refuse_without_grid(
                "quantnet", role, quant, "use bits=1 or estimator=ste, clipped_ste, alpha_blend"
            )

    # -- per-step hooks -------------------------------------------------------------------------
    def step(self, progress: float) -> dict[str, float]:
        if self.gamma_curve is None:
            return {"gamma": self.gamma.detach()}
        gamma = float(self.gamma_curve(progress))
        self.gamma.fill_(gamma)
        return {"gamma": gamma}

    def loss(
        self, model: nn.Module, x: Tensor, y: Tensor, criterion: Criterion
    ) -> tuple[Tensor, Tensor, LogValues]:
        """Task loss plus ``reg_weight * mean(1 - b~^2)`` over all meta-quantized weights."""
        self._reg_terms = []
        try:
            logits = model(x)
            terms = self._reg_terms
        finally:
            self._reg_terms = None
        task = criterion(logits, y)
        logs: LogValues = {"task": task.detach()}
        if not terms:
            return task, logits, logs
        reg = torch.stack([s for s, _ in terms]).sum() / sum(c for _, c in terms)
        logs["meta_reg"] = reg.detach()
        return task + self.reg_weight * reg, logits, logs

    def param_groups(self, lr: float) -> list[dict[str, Any]]:
        params = [p for p in self.parameters() if p.requires_grad]
        if not params:
            return []
        meta_lr = float(self.meta_lr) if self.meta_lr is not None else lr
        return [{"params": params, "lr": meta_lr, "weight_decay": 0.0}]

    def final_form_progress(self, resolution: int = 1000) -> float:
        """Where gamma reaches the end of its schedule: the soft network never switches to
        the hard one, so from there it is as close to the deployed network as training takes
        it (as AQE's stand-in at the end of its beta); a constant gamma: from the start."""
        if self.gamma_curve is None:
            return 0.0
        return reaches(self.gamma_curve, float(self.gamma_curve(1.0)), resolution)

    def state_summary(self) -> dict[str, float]:
        return {"gamma": float(self.gamma)}
