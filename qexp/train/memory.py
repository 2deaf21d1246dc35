"""Peak memory of a run (resident set, GPU), keeping the C heap from hoarding freed memory, and
keeping a GPU-only compiler out of processes without a GPU."""

from __future__ import annotations

import ctypes
import ctypes.util
import resource
import sys

import torch


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MB (10^6 bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports kilobytes, macOS bytes
    return peak / 1e6 if sys.platform == "darwin" else peak * 1024 / 1e6


def peak_gpu_mb(device: torch.device) -> float | None:
    """Peak GPU memory allocated by tensors on ``device`` so far, in MB; None off CUDA."""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 1e6


def peak_memory(device: torch.device) -> dict[str, float]:
    """``peak_rss_mb`` and, on CUDA devices, ``peak_gpu_mb``, rounded for metrics.json."""
    out = {"peak_rss_mb": round(peak_rss_mb(), 1)}
    gpu = peak_gpu_mb(device)
    if gpu is not None:
        out["peak_gpu_mb"] = round(gpu, 1)
    return out


def trim_heap() -> bool:
    """Give the C heap's free pages back to the system (glibc ``malloc_trim``).

    Tensors below glibc's (self-raising) mmap threshold live on the heap, and freed ones stay
    resident for reuse. Trimming before an evaluation lets the evaluation batches use those
    pages instead of adding to the peak. Cheap (no copying); returns False without glibc.
    Making every large block its own mapping instead (``mallopt``) keeps the resident set
    lower through training but page-faults every step's activations anew (measured 40%
    slower steps), so qexp does not.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
        return True
    except (OSError, AttributeError):
        return False


def hide_triton_without_gpu() -> bool:
    """Keep triton (a GPU kernel compiler) from loading in a process that has no CUDA device.

    torch.optim imports torch._dynamo on its first use, and dynamo imports triton whenever the
    package is installed (it is a dependency of torch's CUDA wheels): 76 MB resident on this
    stack for a module that only generates GPU kernels. With no CUDA device it can do nothing,
    and torch's CPU-only wheels ship without it, so hiding it is a setup torch supports
    (``torch.compile`` on CPU generates C++). Returns whether it was hidden; does nothing if a
    GPU is visible or triton is already loaded.
    """
    if "triton" in sys.modules or torch.cuda.is_available():
        return False
    sys.modules["triton"] = None  # type: ignore[assignment]  # `import triton` -> ImportError
    return True
