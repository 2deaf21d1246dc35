"""Data-parallel training over several processes (torchrun, or Slurm tasks via submitit).

Every rank runs the same trainer on the same global batches: each takes its slice
``batch[rank::world]`` of the samples (and of their targets: a text batch has ``block_size``
targets per window), gradients are averaged over the ranks after the backward pass (one
all-reduce per dtype), so every rank applies the same update, and training metrics and
evaluation counts are summed over the ranks. Rank 0 alone writes logs, TensorBoard events,
checkpoints and ``metrics.json``.

Gradients are reduced after the whole backward pass rather than by DistributedDataParallel's
per-parameter hooks, because some estimators (block replacement, QuantNet) use parameters in
forwards outside the model's own, which DDP's reducer rejects; the update is the same.

State calibrated from data (activation ranges, LSQ steps, PACT clips, DQ parameters, the sign
of activation grids) is **broadcast from rank 0** after the calibration step, and buffers
(BatchNorm statistics, EMA ranges) are broadcast from rank 0 after every optimizer step, as
DistributedDataParallel does, so every rank holds rank 0's state.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

log = logging.getLogger("qexp")


@dataclass(frozen=True)
class DistInfo:
    """This process's place in a data-parallel run."""

    rank: int
    world: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        """Whether this rank writes the run's files."""
        return self.rank == 0


#: a single process: rank 0 of 1
SINGLE = DistInfo(rank=0, world=1, local_rank=0)


def env_world() -> DistInfo:
    """Rank and world size from the launcher's environment (torchrun's, or Slurm's when a
    job runs several tasks); SINGLE when there is one process."""
    if "WORLD_SIZE" not in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        _export_slurm_env()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return SINGLE
    rank = int(os.environ["RANK"])
    return DistInfo(rank=rank, world=world, local_rank=int(os.environ.get("LOCAL_RANK", rank)))


def _export_slurm_env() -> None:
    """Set torch.distributed's variables (RANK, WORLD_SIZE, MASTER_ADDR...) from Slurm's."""
    try:
        from submitit.helpers import TorchDistributedEnvironment
    except ImportError:  # pragma: no cover - submitit is a dependency
        return
    TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


def init(info: DistInfo, device: torch.device) -> torch.device:
    """Join the process group (nccl on CUDA, gloo elsewhere); return this rank's device."""
    if info.world <= 1 or dist.is_initialized():
        return device
    if device.type == "cuda":
        device = torch.device("cuda", info.local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    log.info("rank %d of %d on %s", info.rank, info.world, device)
    return device


def joined() -> bool:
    """Whether this process is in a process group."""
    return dist.is_available() and dist.is_initialized()


def shutdown() -> None:
    """Leave the process group, if this process joined one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def shard(x: Tensor, y: Tensor, info: DistInfo) -> tuple[Tensor, Tensor, int]:
    """This rank's slice ``[rank::world]`` of a global training batch's samples, and how many
    targets it counts towards the metrics. A batch with fewer samples than ranks (a last,
    partial one) is trained whole on every rank, so no rank gets an empty batch; rank 0 alone
    counts it. Targets are sliced with their samples (:func:`slice_samples`)."""
    if info.world <= 1:
        return x, y, y.numel()
    if x.shape[0] < info.world:
        return x, y, y.numel() if info.is_main else 0
    xs, ys = slice_samples(x, y, info)
    return xs, ys, ys.numel()


def eval_shard(x: Tensor, y: Tensor, info: DistInfo) -> tuple[Tensor, Tensor]:
    """This rank's slice of an evaluation batch (may be empty)."""
    if info.world <= 1:
        return x, y
    return slice_samples(x, y, info)


def slice_samples(x: Tensor, y: Tensor, info: DistInfo) -> tuple[Tensor, Tensor]:
    """Samples ``rank, rank + world, ...`` of ``x`` and the targets of exactly those samples.

    ``y`` holds one target per sample (classification) or the same number per sample
    flattened sample-major (text: ``(B * block_size,)`` next characters of ``(B, block_size)``
    windows), so it is cut into per-sample rows before slicing: slicing the flat targets with
    the samples' stride would hand a rank other windows' characters.
    """
    samples = x.shape[0]
    if samples == 0:
        return x, y
    if y.shape[0] % samples:
        raise ValueError(
            f"a batch of {samples} samples has {y.shape[0]} targets: expected a multiple"
        )
    per_sample = y.reshape(samples, y.shape[0] // samples, *y.shape[1:])
    mine = per_sample[info.rank :: info.world]
    return x[info.rank :: info.world], mine.reshape(-1, *y.shape[1:])


def average_gradients(model: nn.Module, info: DistInfo) -> None:
    """Average the parameters' gradients over the ranks (parameters without a gradient on
    every rank keep none; one with a gradient on some ranks counts zero on the others)."""
    if info.world <= 1:
        return
    params = [p for p in model.parameters() if p.requires_grad]
    has = torch.tensor([p.grad is not None for p in params], dtype=torch.float32)
    dist.all_reduce(has, op=dist.ReduceOp.MAX)
    by_dtype: dict[tuple[torch.dtype, torch.device], list[nn.Parameter]] = {}
    for p, present in zip(params, has.tolist(), strict=True):
        if present:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            by_dtype.setdefault((p.grad.dtype, p.grad.device), []).append(p)
    for group in by_dtype.values():
        flat = torch.cat([p.grad.reshape(-1) for p in group])
        dist.all_reduce(flat)
        flat.div_(info.world)
        offset = 0
        for p in group:
            n = p.grad.numel()
            p.grad.copy_(flat[offset : offset + n].view_as(p.grad))
            offset += n


def broadcast_state(module: nn.Module, info: DistInfo, buffers_only: bool = False) -> None:
    """Copy rank 0's parameters and buffers (or only its buffers) to every rank.

    After a full copy the quantizers' Python mirrors of their buffers (the grid's sign,
    calibration flags, the searched ratio) are refreshed by reloading the state; buffer-only
    copies (every step) carry running statistics, which have no mirror.
    """
    if info.world <= 1:
        return
    tensors = list(module.buffers())
    if not buffers_only:
        tensors = [*module.parameters(), *tensors]
    groups: dict[tuple[torch.dtype, torch.device], list[Tensor]] = {}
    for t in tensors:
        if t.numel():
            groups.setdefault((t.dtype, t.device), []).append(t)
    with torch.no_grad():
        for group in groups.values():
            flat = torch.cat([t.detach().reshape(-1) for t in group])
            if flat.dtype == torch.bool:  # not every backend sends bool
                flat = flat.to(torch.uint8)
            dist.broadcast(flat, src=0)
            offset = 0
            for t in group:
                t.copy_(flat[offset : offset + t.numel()].view_as(t))
                offset += t.numel()
    if not buffers_only:
        module.load_state_dict(module.state_dict())


def sum_over_ranks(values: list[float], info: DistInfo, device: torch.device) -> list[float]:
    """Element-wise sum of ``values`` over the ranks (one all-reduce)."""
    if info.world <= 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def barrier(info: DistInfo) -> None:
    """Wait until every rank got here (e.g. rank 0 has written a checkpoint the others read)."""
    if info.world > 1:
        dist.barrier()


def from_main(obj: object, info: DistInfo) -> object:
    """Rank 0's value of ``obj`` on every rank (a small picklable object)."""
    if info.world <= 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
