"""The estimator interface: how a quantized network is trained.

A quantizer says where values land; an estimator says how the training forward and backward
pass through it. Every quantized body layer calls its run's estimator for its weight and its
input activation during training; evaluation bypasses the estimator and uses the hard grid.

Seams for new methods (each a file here plus a YAML in conf/estimator/):

- ``weight`` / ``activation``: the training forward of one layer's weight / input;
- ``step``: called once per optimizer step with training progress p in [0, 1], reads schedule
  curves, returns values to log under ``estimator/``;
- ``loss``: the training loss of a batch (add terms, distil from ``partner``, build mixed nets);
- ``param_groups``: the estimator's own learnable parameters with their own optimizer settings;
- ``after_optimizer_step``: constrain latent weights or own parameters;
- ``deploy_weight``: the deployed (hard) weight of a layer, where it is not ``w_quant.hard(w)``;
- ``attach``: sees the whole model (its layers and blocks) and, if ``needs_partner``, a frozen
  full-precision partner of the same architecture.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from qexp.quant.base import Quantizer, ste
from qexp.quant.refs import keep_reference

if TYPE_CHECKING:
    from qexp.quant.layers import QuantLayer

Criterion = Callable[[Tensor, Tensor], Tensor]
#: values an estimator logs for a batch: 0-d tensors stay on the device until the trainer writes
#: them (every ``log_every`` steps), so a step needs no host sync to produce them
LogValues = dict[str, float | Tensor]


@dataclass
class EstimatorContext:
    """What an estimator may read when it is attached to a model."""

    total_steps: int
    device: torch.device
    run_dir: Path | None = None
    #: frozen full-precision model of the same architecture (set when ``needs_partner``)
    partner: nn.Module | None = None


class Estimator(nn.Module):
    """Base estimator: straight-through (STE) for weights and activations.

    Subclasses override only what they change. The estimator is an nn.Module owned by the
    QuantModel, so its parameters and buffers are checkpointed with the model.
    """

    #: set to True to receive a frozen full-precision partner in ``attach``
    needs_partner: bool = False
    #: True where the training forward differs from the hard network (soft stand-ins): the
    #: trainer then also evaluates the training-time forward and logs the gap.
    has_soft_forward: bool = False

    #: the QuantModel being trained (set by ``attach``; a reference, not a submodule)
    model: nn.Module | None
    #: the frozen full-precision partner (set by ``attach`` when ``needs_partner``; a reference)
    partner: nn.Module | None

    def __init__(self) -> None:
        super().__init__()
        keep_reference(self, "model", None)
        keep_reference(self, "partner", None)

    # -- wiring ------------------------------------------------------------------------------
    def check_model(self, net: nn.Module) -> None:
        """Raise QexpError if ``net`` cannot be trained by this estimator (called before any
        costly preparation such as training a partner); default: every model is fine."""

    def check_quantizer(self, role: str, quant: Quantizer) -> None:
        """Raise QexpError if this estimator cannot train body layers whose ``role``
        (``"weight"`` / ``"activation"``) quantizer is ``quant`` (the preflight calls it before
        any job starts; see qexp.estimators.compat); default: every quantizer is fine."""

    def attach(self, model: nn.Module, ctx: EstimatorContext) -> None:
        """Called once after the model is wrapped; keep references, build per-layer state."""
        keep_reference(self, "model", model)
        keep_reference(self, "partner", ctx.partner)

    # -- per-layer training forward --------------------------------------------------------------
    def weight(self, layer: QuantLayer, w: Tensor) -> Tensor:
        """Training-time weight of ``layer``; default: the quantizer's straight-through forward."""
        return layer.w_quant(w)

    def activation(self, layer: QuantLayer, x: Tensor) -> Tensor:
        """Training-time input activation of ``layer``; default: straight-through."""
        return layer.a_quant(x)

    def deploy_weight(self, layer: QuantLayer, w: Tensor) -> Tensor:
        """Deployed (evaluation) weight of ``layer``; default: the quantizer's hard grid values.

        Override where the trained network's hard weights are not ``w_quant.hard(w)``, e.g. a
        meta quantizer whose output decides each weight's level. Must hold at most
        ``2 ** w_bits`` values per output channel (the level check counts this tensor).
        """
        return layer.w_quant.hard(w)

    # -- per-step hooks -------------------------------------------------------------------------
    def step(self, progress: float) -> dict[str, float]:
        """Advance schedules to training progress ``progress``; return values to log."""
        return {}

    def loss(
        self, model: nn.Module, x: Tensor, y: Tensor, criterion: Criterion
    ) -> tuple[Tensor, Tensor, LogValues]:
        """Training loss of one batch: (loss, logits of the trained network, values to log,
        detached 0-d tensors or floats)."""
        logits = model(x)
        return criterion(logits, y), logits, {}

    def param_groups(self, lr: float) -> list[dict[str, Any]]:
        """Optimizer groups for the estimator's own parameters (``lr`` is the run's base LR)."""
        params = [p for p in self.parameters() if p.requires_grad]
        return [{"params": params, "lr": lr, "weight_decay": 0.0}] if params else []

    def after_optimizer_step(self) -> None:
        """Called after every optimizer step (e.g. to clip latent weights)."""

    def is_final_form(self) -> bool:
        """Whether the network now is the method's final one (e.g. alpha-blending at alpha=1).

        Only epochs where this holds can be picked as the best-validation model.
        """
        return True

    def final_form_progress(self, resolution: int = 1000) -> float:
        """The training progress p in [0, 1] from which the method trains its deployed form
        (alpha-blending: alpha = 1; a soft stand-in: its sharpness at the end of its
        schedule); 0 for methods that train the deployed network from the start.

        A tuner never prunes a trial before this point: a method in its soft phase is not
        judged on the hard network. The default steps a copy of the estimator through
        ``resolution`` points of progress and returns the first where :meth:`is_final_form`
        holds; estimators whose deployed form is not what ``is_final_form`` tracks override it.
        """
        probe = copy.deepcopy(self)
        for k in range(resolution + 1):
            p = k / resolution
            probe.step(p)
            if probe.is_final_form():
                return p
        return 1.0

    def passes_per_step(self) -> dict[str, int]:
        """Whole-network forward and backward passes one training step costs (a study's cost
        column); estimators that run extra networks (block replacement) say how many."""
        return {"forward": 1, "backward": 1}

    def state_summary(self) -> dict[str, float]:
        """Current schedule values, for logs and metrics.json."""
        return {}


def straight_through(x: Tensor, hard: Tensor, mask: Tensor | None = None) -> Tensor:
    """Forward ``hard``; backward the incoming gradient times ``mask`` (1 where omitted)."""
    if mask is None:
        return ste(x, hard)
    passed = x * mask
    return passed + (hard - passed).detach()
