"""torch.compile for the training forward: whether to use it, and falling back to eager.

``trainer.compile``: ``off`` never compiles; ``on`` compiles wherever torch can; ``auto``
compiles on CUDA only (on CPU the compile takes longer than a short run saves). The model
is compiled after the calibration step, so the compiled graph holds no first-batch work; the
quantized layers have no host syncs or data-dependent Python branches, so it is one graph.

On CPU the model's ``nn.ReLU`` modules are swapped for :class:`OutputMaskReLU` first (same
values and gradients). Why: a quantized network feeds each ReLU's output to an activation
quantizer, not to the next convolution, so the float output is no longer kept for the backward
pass and the compiler keeps a one-byte mask instead; inductor's CPU code stores and loads such
masks one byte at a time (measured: the whole compiled-ResNet-20 overhead of a W4/A4 step
against the float one). Reading the mask off the float output keeps every store vectorised.
On CUDA the byte masks are cheap and 4x smaller, so the model is left as it is.

If compiling is unavailable or the first compiled step fails, one warning line says why and
training goes on eagerly from the state before that step.
"""

from __future__ import annotations

import importlib.util
import logging
import shutil

import torch
from torch import nn

from qexp.spec import COMPILE_MODES as MODES

log = logging.getLogger("qexp")


def compile_unavailable(device: torch.device) -> str | None:
    """Why torch.compile cannot train on ``device`` here; None when it can."""
    if not hasattr(torch, "compile"):
        return f"torch {torch.__version__} has no torch.compile"
    if device.type == "cuda" and importlib.util.find_spec("triton") is None:
        return "triton is not installed (torch.compile needs it on CUDA)"
    if device.type == "cpu" and not any(shutil.which(c) for c in ("c++", "g++", "clang++")):
        return "no C++ compiler found (torch.compile needs one on CPU)"
    if device.type not in ("cpu", "cuda"):
        return f"torch.compile is not used on {device.type} devices"
    return None


def wants_compile(mode: str, device: torch.device) -> bool:
    """Whether ``trainer.compile=mode`` compiles on ``device`` (warns once where ``on``
    cannot)."""
    if mode not in MODES:
        raise ValueError(f"trainer.compile must be one of {MODES}, got {mode!r}")
    if mode == "off" or (mode == "auto" and device.type != "cuda"):
        return False
    reason = compile_unavailable(device)
    if reason is not None:
        if mode == "on":
            log.warning("trainer.compile=on: %s; training eagerly", reason)
        return False
    return True


class _ReLUFromOutput(torch.autograd.Function):
    """``relu(x)`` whose backward reads the saved float output: ``grad * sign(relu(x))``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        y = torch.relu(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # noqa: D102
        (y,) = ctx.saved_tensors
        # sign(y) is 1 where y > 0 and 0 where y == 0: nn.ReLU's gradient, computed in float
        # so the compiled forward saves no boolean tensor
        return grad * torch.sign(y)


class OutputMaskReLU(nn.ReLU):
    """``nn.ReLU`` (same values and gradients) whose backward uses its float output rather than
    a boolean mask: see the module docstring. Never in place."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _ReLUFromOutput.apply(x)


def use_output_mask_relus(model: nn.Module) -> int:
    """Swap every plain ``nn.ReLU`` of ``model`` for :class:`OutputMaskReLU`, in place; returns
    how many were swapped (no parameters or buffers change, so checkpoints are unaffected)."""
    swapped = 0
    for parent in model.modules():
        for name, child in list(parent.named_children()):
            if type(child) is nn.ReLU:
                setattr(parent, name, OutputMaskReLU())
                swapped += 1
    return swapped


def compiled(model: nn.Module, device: torch.device | None = None) -> nn.Module:
    """``model`` under torch.compile (an OptimizedModule sharing its parameters and buffers;
    checkpoints keep using ``model`` itself, so their keys do not change). On CPU devices the
    ReLUs are swapped first (:class:`OutputMaskReLU`)."""
    if device is None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
    if device.type == "cpu":
        use_output_mask_relus(model)
    return torch.compile(model)
