"""Which GPU a job of a local sweep trains on: round robin over the visible devices."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

#: trainer.device values a sweep may pin to one GPU (explicit choices such as cuda:1 or cpu
#: are the user's and stay)
_PINNABLE = ("auto", "cuda")


def round_robin_gpu(job_num: int, gpu_count: int) -> int | None:
    """GPU index of sweep job ``job_num`` among ``gpu_count`` visible GPUs (None: no GPU).

    Job numbers are Hydra's (0, 1, 2, ... in sweep order), so jobs that run side by side get
    different GPUs as long as no more jobs run at once than there are GPUs.
    """
    if gpu_count <= 0:
        return None
    return int(job_num) % gpu_count


def sweep_job_device(
    device: str, launcher: Mapping[str, Any] | None, job_num: int | None, gpu_count: int
) -> str:
    """trainer.device for one job of a sweep.

    Jobs of the joblib launcher run side by side on this machine: with ``device`` auto or
    cuda and GPUs visible, each gets ``cuda:<job_num mod gpu_count>``. Any other launcher
    (submitit jobs get their own allocation; Hydra's basic launcher runs one job at a time), an
    explicit device, or no GPU leaves ``device`` as it is.
    """
    target = str((launcher or {}).get("_target_", "")).lower()
    if "joblib" not in target or device not in _PINNABLE or job_num is None:
        return device
    gpu = round_robin_gpu(job_num, gpu_count)
    return device if gpu is None else f"cuda:{gpu}"


def visible_gpu_count() -> int:
    """CUDA devices this process sees (CUDA_VISIBLE_DEVICES applies)."""
    import torch  # lazy: the sweep callback side never needs torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0
