"""Training-step throughput: full precision vs quantized (STE, 4-bit W/A), interleaved.

Both models are built from the default config exactly as `qexp train` builds them, and their
training steps (forward, backward, optimizer step, quantizer clamps) alternate in rounds inside
one process, so machine noise hits both alike. Prints per-step times and their ratio.

    python scripts/bench.py                   # default model on Fashion-MNIST-shaped batches
    python scripts/bench.py --rounds 20 --steps 10 model=resnet20 dataset=cifar10
Target on CPU: quantized step time at most 1.25x full precision.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_module

from qexp.config.schema import register_schemas
from qexp.quant.base import Quantizer
from qexp.train.build import build_model, resolve_device
from qexp.train.optim import build_optimizer

SHAPES = {"fashion_mnist": (1, 28), "mnist": (1, 28), "digits": (1, 8), "cifar10": (3, 32),
          "cifar100": (3, 32), "imagefolder": (3, 224)}
CLASSES = {"cifar100": 100, "imagefolder": 1000}


class _Info:
    def __init__(self, name: str) -> None:
        self.name = name
        self.in_channels, self.image_size = SHAPES[name]
        self.num_classes = CLASSES.get(name, 10)


def make_step(overrides: list[str], device: torch.device):
    """A closure running one training step of the model the overrides describe."""
    with initialize_config_module("qexp.conf", version_base=None):
        cfg = compose("config", overrides=overrides)
    info = _Info(cfg.dataset.name)
    model = build_model(cfg, info, device, total_steps=1000)
    opt = build_optimizer(model, cfg.trainer)
    quantizers = [m for m in model.modules() if isinstance(m, Quantizer)]
    bs = int(cfg.trainer.batch_size)
    x = torch.randn(bs, info.in_channels, info.image_size, info.image_size, device=device)
    y = torch.randint(0, info.num_classes, (bs,), device=device)
    model.train()

    def step() -> None:
        loss, _, _ = model.estimator.loss(model, x, y, F.cross_entropy)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        for q in quantizers:
            q.clamp_()
        model.estimator.after_optimizer_step()

    return step


def time_steps(step, n: int, device: torch.device) -> float:
    """Seconds per step over ``n`` steps."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15, help="interleaved rounds per model")
    parser.add_argument("--steps", type=int, default=10, help="training steps per round")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--device", default="auto")
    parser.add_argument("overrides", nargs="*", help="config overrides for both models")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    register_schemas()
    device = resolve_device(args.device)
    torch.manual_seed(0)
    fp = make_step([*args.overrides, "bits=32"], device)
    quant = make_step([*args.overrides, "bits=4", "estimator=ste"], device)
    for step in (fp, quant):  # warm-up: allocator, first-batch calibration
        time_steps(step, 3, device)
    fp_times, q_times = [], []
    for _ in range(args.rounds):
        fp_times.append(time_steps(fp, args.steps, device))
        q_times.append(time_steps(quant, args.steps, device))
    fp_ms, q_ms = statistics.median(fp_times) * 1e3, statistics.median(q_times) * 1e3
    ratios = [q / f for q, f in zip(q_times, fp_times, strict=True)]
    print(f"device {device}, threads {torch.get_num_threads()}, overrides {args.overrides or '-'}")
    print(f"full precision : {fp_ms:8.2f} ms/step (median of {args.rounds} rounds)")
    print(f"quantized w4a4 : {q_ms:8.2f} ms/step")
    print(f"ratio quantized/full precision: {q_ms / fp_ms:.3f} "
          f"(per-round ratios: median {statistics.median(ratios):.3f}, "
          f"min {min(ratios):.3f}, max {max(ratios):.3f}); target <= 1.25")


if __name__ == "__main__":
    main()
