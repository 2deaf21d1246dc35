"""An estimator that wraps another: the wrapped one trains the layers, the wrapper adds to it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

from qexp.errors import QexpError
from qexp.estimators.base import Estimator, EstimatorContext
from qexp.quant.base import Quantizer

if TYPE_CHECKING:
    from qexp.quant.layers import QuantLayer


class WrappingEstimator(Estimator):
    """Base of estimators built around another estimator (``base``), e.g. block replacement.

    Every per-layer seam (training weight and activation, deployed weight), the schedules
    (``step``, final form, state summary), the own parameters and the after-step hook are the
    base's; a subclass overrides what it adds (``loss``, ``attach``, ...) and calls the base
    where it extends a seam. The base is a submodule, so its parameters and buffers are
    checkpointed with the wrapper.

    Args:
        base: the wrapped estimator; it may not itself need a partner.
    """

    #: the wrapped estimator (a submodule)
    base: Estimator

    def __init__(self, base: Estimator) -> None:
        super().__init__()
        if not isinstance(base, Estimator):
            raise QexpError(
                f"estimator.base must build a qexp Estimator, got {type(base).__name__}"
            )
        if base.needs_partner:
            raise QexpError("estimator.base cannot itself need a partner")
        self.base = base
        # The training forward differs from the hard net exactly when the base's does.
        self.has_soft_forward = base.has_soft_forward

    # -- wiring ------------------------------------------------------------------------------
    def check_model(self, net: nn.Module) -> None:
        self.base.check_model(net)

    def check_quantizer(self, role: str, quant: Quantizer) -> None:
        self.base.check_quantizer(role, quant)  # the base trains the same layers

    def attach(self, model: nn.Module, ctx: EstimatorContext) -> None:
        super().attach(model, ctx)
        self.base.attach(model, ctx)

    # -- per-layer seams: the base's ---------------------------------------------------------------
    def weight(self, layer: QuantLayer, w: Tensor) -> Tensor:
        return self.base.weight(layer, w)

    def activation(self, layer: QuantLayer, x: Tensor) -> Tensor:
        return self.base.activation(layer, x)

    def deploy_weight(self, layer: QuantLayer, w: Tensor) -> Tensor:
        return self.base.deploy_weight(layer, w)

    # -- per-step hooks: the base's ----------------------------------------------------------------
    def step(self, progress: float) -> dict[str, float]:
        return self.base.step(progress)

    def param_groups(self, lr: float) -> list[dict[str, Any]]:
        return self.base.param_groups(lr)

    def after_optimizer_step(self) -> None:
        self.base.after_optimizer_step()

    def is_final_form(self) -> bool:
        return self.base.is_final_form()

    def final_form_progress(self, resolution: int = 1000) -> float:
        return self.base.final_form_progress(resolution)

    def state_summary(self) -> dict[str, float]:
        return self.base.state_summary()
