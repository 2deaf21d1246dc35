"""Alpha-blending (AB; Liu & Mattina, IJCAI 2019): train without a straight-through estimator.

A body layer trains with the blend ``w_ab = (1 - alpha) w + alpha sg(q(w))`` of its latent
weight and the hard-quantized one, where ``sg`` stops the gradient. Nothing flows through the
quantizer, so the latent weight's gradient is exactly ``(1 - alpha) dL/dw_ab``. ``alpha`` is not
learned: it follows a curve of training progress from 0 (full precision) to 1 (the quantized
network), read from ``schedule.alpha`` (conf/curves.yaml).

Consequences worth knowing when reading results:

- at ``alpha = 1`` the body weights receive no gradient at all (the factor ``1 - alpha`` is 0);
  what still trains in that last phase is everything else (BatchNorm, biases, edge layers), and
  optimizers with momentum keep moving the weights for a while;
- with ``blend_activations`` the same holds for activations, so at ``alpha = 1`` no gradient
  reaches the layers before a blended input;
- learned quantizer parameters (step sizes, clipping values) get no gradient from a blended
  tensor, since ``q`` is used only through its stopped hard values.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from qexp.curves import Ramp
from qexp.estimators.base import Estimator, EstimatorContext
from qexp.quant.layers import QuantLayer

AlphaCurve = Callable[[float], float]


def blend(x: Tensor, hard: Tensor, alpha: Tensor) -> Tensor:
    """``(1 - alpha) x + alpha sg(hard)``: forward the blend, backward ``(1 - alpha)`` times."""
    a = alpha.to(device=x.device, dtype=x.dtype)
    return x * (1 - a) + a * hard.detach()


class AlphaBlend(Estimator):
    """Alpha-blending of latent and hard-quantized weights (optionally activations too).

    Args:
        alpha: the schedule of alpha over training progress (a curve such as
            ``qexp.curves.Ramp``; default: the cubic ramp with p0=0, p1=0.8). It must
            reach exactly 1 at progress 1, and a ramp's ``p1`` must be <= 1.
        blend_activations: blend each body layer's input the same way, with the same alpha;
            ``False`` keeps the base estimator (straight-through) for activations.

    Schedule end: the trainer's last optimizer step sees progress ``(T - 1) / T``, so a ramp
    with ``p1`` close to 1 would stop just short of 1. qexp's rule: the last step of training
    always uses ``alpha = 1``. With the default ``p1 = 0.8`` this changes nothing (the last 20%
    of training already runs the hard network); with ``p1 = 1`` it makes the final epoch the
    only one that counts as the method's final form (see ``is_final_form``).
    """


    def __init__(self, alpha: AlphaCurve | None = None, blend_activations: bool = False) -> None:
        super().__init__()
        if alpha is None:
            alpha = Ramp(start=0.0, end=1.0, p0=0.0, p1=0.8, shape="cubic")
        if not callable(alpha):
            raise ValueError(f"alpha must be a curve of training progress, got {alpha!r}")
        if isinstance(alpha, Ramp) and not 0.0 <= float(alpha.p1) <= 1.0:
            raise ValueError(
                f"alpha's p1={alpha.p1} must lie in [0, 1] so alpha reaches 1 in training"
            )
        end = float(alpha(1.0))
        if end != 1.0:
            raise ValueError(
                f"alpha must reach exactly 1 at the end of training (the quantized network), "
                f"but the curve gives {end} at progress 1"
            )
        start = float(alpha(0.0))
        if not 0.0 <= start <= 1.0:
            raise ValueError(f"alpha must stay in [0, 1], but the curve starts at {start}")
        self.alpha_curve = alpha
        self.blend_activations = bool(blend_activations)
        self.total_steps = 0
        # A buffer, so a checkpoint restores the blend the network was trained with last.
        self.register_buffer("alpha", torch.tensor(0.0))

    def attach(self, model: nn.Module, ctx: EstimatorContext) -> None:
        super().attach(model, ctx)
        self.total_steps = int(ctx.total_steps)

    # -- schedule ----------------------------------------------------------------------------
    def step(self, progress: float) -> dict[str, float]:
        value = float(self.alpha_curve(progress))
        last = self.total_steps > 0 and progress >= (self.total_steps - 1) / self.total_steps
        if last:
            value = 1.0  # the last step trains the fully quantized network (see class doc)
        value = min(max(value, 0.0), 1.0)
        self.alpha.fill_(value)
        return {"alpha": value}

    def is_final_form(self) -> bool:
        return float(self.alpha) >= 1.0

    def state_summary(self) -> dict[str, float]:
        return {"alpha": float(self.alpha)}

    # -- training forward ----------------------------------------------------------------------
    def weight(self, layer: QuantLayer, w: Tensor) -> Tensor:
        return blend(w, layer.w_quant.hard(w), self.alpha)

    def activation(self, layer: QuantLayer, x: Tensor) -> Tensor:
        if not self.blend_activations:
            return super().activation(layer, x)
        return blend(x, layer.a_quant.hard(x), self.alpha)

    def extra_repr(self) -> str:
        return f"alpha={float(self.alpha):.4g}, blend_activations={self.blend_activations}"
