"""One training step, written once: used by the trainer and by scripts/bench.py.

A step is: advance the estimator's schedules, set the LR, the estimator's loss of the batch
(plus the budget penalty), backward, gradients averaged over the ranks, optional gradient
clipping, the optimizer step, every quantizer's ``clamp_``, the estimator's
``after_optimizer_step``, the weight quantizers' ``refresh`` (outside the forward, so a compiled
graph holds no range search) and rank 0's buffers broadcast.

The first step of a fresh run is the calibration phase (qexp.quant.calibrate). Where
``trainer.compile`` asks for it, the step after calibration switches the training forward to
``torch.compile`` (qexp/train/compile.py); if that fails the state from before the step comes
back and training goes on eagerly.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qexp.curves import Curve
from qexp.estimators.base import LogValues
from qexp.estimators.model import QuantModel
from qexp.quant.base import Quantizer
from qexp.quant.calibrate import calibration
from qexp.quant.layers import refresh_weight_ranges
from qexp.spec import TrainerSettings
from qexp.train.checkpoint import rng_state, set_rng_state
from qexp.train.compile import compiled, wants_compile
from qexp.train.distributed import SINGLE, DistInfo, average_gradients, broadcast_state, shard
from qexp.train.optim import set_lr

log = logging.getLogger("qexp")

#: the budget penalty of a step (0.0 without a budget); qexp.train.precision provides it
Penalty = Callable[[], "Tensor | float"]


@dataclass
class StepResult:
    """What one step reports: detached loss and logits, this rank's labels and sample count,
    the LR used, and the estimator's values (its schedules and its loss terms) to log."""

    loss: Tensor
    logits: Tensor
    labels: Tensor
    samples: int
    lr: float
    schedule: dict[str, float]
    logs: LogValues


class TrainStep:
    """The training step of one quantized model.

    Args:
        model: the quantized model with its estimator attached.
        optimizer: its optimizer (each group with ``base_lr``).
        lr_curve: LR multiplier as a function of training progress.
        settings: grad clipping, AMP and compile settings.
        device: where the model lives.
        penalty: the budget penalty added to every step's loss.
        dist: this process's rank in a data-parallel run.
    """

    def __init__(
        self,
        model: QuantModel,
        optimizer: torch.optim.Optimizer,
        lr_curve: Curve,
        settings: TrainerSettings,
        device: torch.device,
        penalty: Penalty = lambda: 0.0,
        dist: DistInfo = SINGLE,
    ) -> None:
        self.model, self.optimizer, self.lr_curve = model, optimizer, lr_curve
        self.settings, self.device, self.penalty, self.dist = settings, device, penalty, dist
        use_amp = bool(settings.amp) and device.type == "cuda"
        self.amp_dtype = getattr(torch, settings.amp_dtype) if use_amp else None
        self.scaler = torch.amp.GradScaler(
            "cuda", enabled=use_amp and self.amp_dtype == torch.float16
        )
        self.quantizers = [m for m in model.net.modules() if isinstance(m, Quantizer)]
        # What the training forward calls: the model, or the model under torch.compile (from
        # the step after calibration on).
        self.train_model: nn.Module = model
        self._compile_pending = wants_compile(settings.compile, device)
        self.compiled = False

    def autocast(self) -> contextlib.AbstractContextManager:
        """Mixed precision where ``trainer.amp`` asks for it (CUDA only), else a no-op."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def __call__(self, x: Tensor, y: Tensor, step: int, total_steps: int) -> StepResult:
        """Train on the global batch ``(x, y)`` as optimizer step ``step`` of ``total_steps``
        (this rank takes its slice of the batch)."""
        model, opt, est = self.model, self.optimizer, self.model.estimator
        progress = step / total_steps
        schedule = est.step(progress)
        lr = set_lr(opt, self.lr_curve(progress))
        x, y, n = shard(x, y, self.dist)
        loss, logits, logs = self._forward_backward(x, y, step)
        if self.settings.grad_clip is not None:
            self.scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), float(self.settings.grad_clip))
        self.scaler.step(opt)
        self.scaler.update()
        for q in self.quantizers:
            q.clamp_()
        est.after_optimizer_step()
        refresh_weight_ranges(model, step + 1)
        # every rank holds rank 0's calibrated state, and its buffers after every step
        broadcast_state(model, self.dist, buffers_only=step + 1 > 1)
        return StepResult(loss.detach(), logits.detach(), y, n, lr, schedule, logs)

    def _forward_backward(self, x: Tensor, y: Tensor, step: int):
        """Loss of the batch, its backward pass and the gradients averaged over the ranks."""
        if self._compile_pending and step > 0:
            self._compile_pending = False
            return self._first_compiled_step(x, y, step)
        # The first step of a fresh run is the calibration phase: quantizers take their
        # data-derived state from this batch (qexp.quant.calibrate).
        calib = calibration(self.model) if step == 0 else contextlib.nullcontext()
        with calib, self.autocast():
            loss, logits, logs = self.model.estimator.loss(
                self.train_model, x, y, F.cross_entropy
            )
        loss = loss + self.penalty()
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        average_gradients(self.model, self.dist)
        return loss, logits, logs

    def _first_compiled_step(self, x: Tensor, y: Tensor, step: int):
        """The first step under torch.compile; if compiling fails, one warning line, the state
        from before the step back, and the step (and the rest of the run) eagerly."""
        before = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        rng = rng_state()
        self.train_model = compiled(self.model, self.device)
        try:
            out = self._forward_backward(x, y, step)
        except Exception as exc:  # any failure of the compiler stack: train eagerly instead
            reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
            log.warning(
                "trainer.compile: torch.compile failed (%s: %s); training eagerly",
                type(exc).__name__,
                reason,
            )
            self.train_model = self.model
            self.model.load_state_dict(before)
            set_rng_state(rng)
            return self._forward_backward(x, y, step)
        self.compiled = True
        log.info("training forward compiled with torch.compile")
        return out
