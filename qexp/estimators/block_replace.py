"""Block replacement on a frozen full-precision partner (BR, arXiv 2412.15846; qexp's choices).

Both the low-precision (LP) net and its full-precision (FP) partner are split into the model's
blocks (``block_names()``). A mixed net is the partner with its block i replaced by the LP net's
block i: the LP block sees FP-like inputs in the forward pass and gets gradients through the
frozen FP blocks downstream in the backward pass. Per step the loss is

    w_task * task(LP) + w_kd * KD(partner -> LP) + w_mixed * mean_i mixed_i

with ``mixed_i`` the cross-entropy and/or KD of mixed net i (``mixed_terms``) and i one random
block or every block (``replace``). KD is ``T^2 * KL(softmax(p / T) || softmax(q / T))``.

The method wraps an ordinary QAT estimator (``base``, default STE): the LP net's weights and
activations, its extra loss terms, parameters and schedules all come from ``base``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qexp.errors import QexpError
from qexp.estimators.base import Criterion, Estimator, EstimatorContext, LogValues
from qexp.estimators.ste import STE
from qexp.estimators.wrapping import WrappingEstimator

REPLACE = ("one", "all")
MIXED_TERMS = ("kd", "ce", "both")


def kd_loss(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """``T^2 * KL(softmax(teacher / T) || softmax(student / T))``, batch mean (Hinton et al.)."""
    t = temperature
    return F.kl_div(
        F.log_softmax(student / t, dim=1),
        F.log_softmax(teacher / t, dim=1),
        reduction="batchmean",
        log_target=True,
    ) * (t * t)


class BlockReplace(WrappingEstimator):
    """Block replacement around a base estimator, distilling from a frozen FP partner (the
    run's top-level ``partner:`` node says where that partner comes from).

    Args:
        base: the estimator that trains the LP net (a nested ``_target_`` node; default STE).
        replace: ``one`` random block per step or ``all`` blocks (one mixed net each).
        mixed_terms: loss of each mixed net: ``kd`` (vs the partner), ``ce`` (vs the labels)
            or ``both``.
        w_task: weight of the LP net's own loss (the base estimator's, e.g. cross-entropy).
        w_kd: weight of KD from the partner to the LP net.
        w_mixed: weight of the mixed nets' loss (averaged over the replaced blocks).
        temperature: KD temperature T.
        mixed_stats: whether mixed-net forwards may update the LP blocks' running statistics
            (BatchNorm, activation ranges). False keeps them to the LP net's own forwards,
            which is the network that is deployed.
    """

    needs_partner = True

    def __init__(
        self,
        base: Estimator | None = None,
        replace: str = "one",
        mixed_terms: str = "kd",
        w_task: float = 1.0,
        w_kd: float = 1.0,
        w_mixed: float = 1.0,
        temperature: float = 4.0,
        mixed_stats: bool = False,
    ) -> None:
        super().__init__(STE() if base is None else base)
        if replace not in REPLACE:
            raise QexpError(f"estimator.replace={replace!r} is not allowed: use one | all")
        if mixed_terms not in MIXED_TERMS:
            raise QexpError(
                f"estimator.mixed_terms={mixed_terms!r} is not allowed: use kd | ce | both"
            )
        if temperature <= 0:
            raise QexpError(f"estimator.temperature must be positive, got {temperature}")
        for key, value in (("w_task", w_task), ("w_kd", w_kd), ("w_mixed", w_mixed)):
            if value < 0:
                raise QexpError(f"estimator.{key} must be >= 0, got {value}")
        self.replace = replace
        self.mixed_terms = mixed_terms
        self.w_task, self.w_kd, self.w_mixed = float(w_task), float(w_kd), float(w_mixed)
        self.temperature = float(temperature)
        self.mixed_stats = bool(mixed_stats)
        self.block_names: list[str] = []
        #: LP-block buffers saved before this step's mixed forwards, restored after the step
        self._saved_buffers: list[tuple[Tensor, Tensor]] = []

    # -- wiring ------------------------------------------------------------------------------
    @staticmethod
    def _blocks_of(net: nn.Module) -> list[str]:
        model = type(net).__name__
        if not callable(getattr(net, "block_names", None)):
            raise QexpError(
                f"block_replace: model {model} declares no blocks: give it a method "
                "block_names() returning the dotted names of its main blocks in forward order "
                "(e.g. ['stage1', 'stage2']), or pick a model with blocks (small_cnn, resnet20)"
            )
        names = list(net.block_names())
        if not names:
            raise QexpError(
                f"block_replace: model {model} has no blocks (block_names() is "
                "empty); pick a model with blocks, e.g. model=small_cnn or resnet20"
            )
        own = {n for n, _ in net.named_modules() if n}
        missing = [n for n in names if n not in own]
        if missing:
            raise QexpError(
                f"block_replace: model {model}'s block_names() names {missing[0]!r}, which is "
                "not one of its submodules: return dotted names of its modules (as "
                "named_modules() lists them)"
            )
        return names

    def check_model(self, net: nn.Module) -> None:
        # before the partner is trained: a model without (valid) blocks can never be used
        super().check_model(net)
        self._blocks_of(net)

    def attach(self, model: nn.Module, ctx: EstimatorContext) -> None:
        if ctx.partner is None:
            raise QexpError("block_replace needs a full-precision partner, but none was given")
        super().attach(model, ctx)
        net = model.net if hasattr(model, "net") else model
        names = self._blocks_of(net)
        partner = ctx.partner
        for name in names:
            try:
                partner.get_submodule(name)
            except AttributeError:
                raise QexpError(
                    f"block_replace: the partner has no block {name!r}: is it the same model?"
                ) from None
        self.block_names = names
        partner.eval()
        for p in partner.parameters():
            p.requires_grad_(False)

    # -- the LP net's training forward, schedules and parameters: the base's (inherited) ------
    def after_optimizer_step(self) -> None:
        self._restore_buffers()
        super().after_optimizer_step()

    # -- mixed nets --------------------------------------------------------------------------------
    @contextmanager
    def replaced(self, index: int | None) -> Iterator[nn.Module]:
        """The partner with block ``index`` computed by the LP net's block (None: no block).

        A forward hook on the partner's block i returns the LP block i applied to the input
        the partner's block received; the partner's own output is discarded.
        """
        partner = self.partner
        if index is None:
            yield partner
            return
        name = self.block_names[index]
        lp_block = self.model.net.get_submodule(name)

        def swap(module: nn.Module, args: tuple[Any, ...], output: Any) -> Tensor:
            return lp_block(*args)

        handle = partner.get_submodule(name).register_forward_hook(swap)
        try:
            yield partner
        finally:
            handle.remove()

    def mixed_forward(self, x: Tensor, index: int | None) -> Tensor:
        """Logits of the mixed net with block ``index`` replaced (None: the partner's)."""
        with self.replaced(index) as net:
            return net(x)

    def _save_buffers(self, indices: list[int]) -> None:
        """Remember the running statistics of the LP blocks that mixed nets will touch."""
        if self.mixed_stats or self._saved_buffers:
            return
        net = self.model.net
        for i in indices:
            for buf in net.get_submodule(self.block_names[i]).buffers():
                self._saved_buffers.append((buf, buf.detach().clone()))

    @torch.no_grad()
    def _restore_buffers(self) -> None:
        # Restored after the backward pass (not right after the forward): autograd may have
        # saved a buffer for backward, and an in-place change before then would be an error.
        for buf, value in self._saved_buffers:
            buf.copy_(value)
        self._saved_buffers = []

    def passes_per_step(self) -> dict[str, int]:
        """The LP net, the partner (forward only) and each mixed net of a step."""
        mixed = 0 if self.w_mixed <= 0 else 1 if self.replace == "one" else len(self.block_names)
        return {"forward": 2 + mixed, "backward": 1 + mixed}

    # -- loss ---------------------------------------------------------------------------------
    def loss(
        self, model: nn.Module, x: Tensor, y: Tensor, criterion: Criterion
    ) -> tuple[Tensor, Tensor, LogValues]:
        """LP task loss (the base's) + KD from the partner + the mixed nets' losses."""
        self._restore_buffers()  # in case the last step's were not (loss called outside fit)
        task, logits, logs = self.base.loss(model, x, y, criterion)
        with torch.no_grad():
            teacher = self.mixed_forward(x, None)
        kd = kd_loss(logits, teacher, self.temperature)
        total = self.w_task * task + self.w_kd * kd
        logs = {**logs, "lp_loss": task.detach(), "kd": kd.detach()}
        if self.w_mixed > 0:
            n = len(self.block_names)
            if self.replace == "one":
                # torch's global RNG: checkpointed with the run, so a resumed run picks the same.
                indices = [int(torch.randint(n, (1,)).item())]
            else:
                indices = list(range(n))
            self._save_buffers(indices)
            mixed = torch.zeros((), device=logits.device)
            for i in indices:
                out = self.mixed_forward(x, i)
                if self.mixed_terms in ("ce", "both"):
                    mixed = mixed + criterion(out, y)
                if self.mixed_terms in ("kd", "both"):
                    mixed = mixed + kd_loss(out, teacher, self.temperature)
            mixed = mixed / len(indices)
            total = total + self.w_mixed * mixed
            logs["mixed"] = mixed.detach()
        return total, logits, logs
