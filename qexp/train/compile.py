"""torch.compile for the training forward: whether to use it, and falling back to eager.

``trainer.compile``: ``off`` never compiles; ``on`` compiles wherever torch can; ``auto``
compiles on CUDA only (on CPU the compile takes longer than a short run saves). The model
is compiled after the calibration step, so the compiled graph holds no first-batch work; the
quantized layers have no host syncs or data-dependent Python branches, so it is one graph.

If compiling is unavailable or the first compiled step fails, one warning line says why and
training goes on eagerly from the state before that step.
"""

from __future__ import annotations

import importlib.util
import logging
import shutil

import torch
from torch import nn

from qexp.config.validate import COMPILE_MODES as MODES

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


def compiled(model: nn.Module) -> nn.Module:
    """``model`` under torch.compile (an OptimizedModule sharing its parameters and buffers;
    checkpoints keep using ``model`` itself, so their keys do not change)."""
    return torch.compile(model)
