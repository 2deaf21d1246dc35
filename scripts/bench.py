"""Training-step time of the quantized network against a true float network, eager and compiled.

For each model (default: the small CNN on 28x28 inputs and ResNet-20 on 32x32 inputs; also
``vit_tiny`` on 28x28 and ``char_gpt`` on windows of 64 characters) four training steps
(forward, backward, optimizer step, and for the quantized net the quantizer clamps and
weight-range refresh the trainer runs) are timed side by side in one process:

- ``fp``: the plain float network (no quantized layer at all, not even 8-bit edges);
- ``quant``: the network as ``qexp train`` builds it (default: W4/A4 uniform, STE, 8-bit edges);
- ``fp+compile``: the float network under plain ``torch.compile``;
- ``quant+compile``: the quantized network compiled as ``qexp train`` compiles it;
- ``fp+copy`` (``--copy-floor``): the float network computing each convolution on a copy of
  its input, the memory traffic of fake quantization without its arithmetic.

Each round runs every variant for ``--steps`` steps; the ratios are taken per round and their
median reported, so machine load that drifts over the run hits all variants alike. On CPU the
clock is this process's CPU time (``--clock cpu``), which other processes on a shared machine
disturb far less than elapsed time; use ``--threads 1`` there, as OpenMP threads spin while
they wait for each other.

    python scripts/bench.py --threads 2
    python scripts/bench.py --models small_cnn --no-compile estimator=clipped_ste bits=2
    python scripts/bench.py --models vit_tiny,char_gpt --no-compile --threads 1
Targets (CPU): quant <= 1.10x fp; quant+compile <= 1.0x fp and <= 1.15x fp+compile.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import time
from collections.abc import Callable
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_module

from qexp.config.schema import register_schemas
from qexp.curves import ConstantLR
from qexp.estimators.base import Estimator
from qexp.train.build import build_net, resolve_device
from qexp.train.optim import build_optimizer
from qexp.train.run import build_model, run_spec
from qexp.train.step import TrainStep

#: data set whose input shape each benchmarked model gets
MODELS = {"small_cnn": "fashion_mnist", "resnet20": "cifar10", "vit_tiny": "fashion_mnist",
          "char_gpt": "text"}
#: the models timed without --models
DEFAULT_MODELS = ("small_cnn", "resnet20")
SHAPES = {"fashion_mnist": (1, 28), "mnist": (1, 28), "digits": (1, 8), "cifar10": (3, 32),
          "cifar100": (3, 32), "imagefolder": (3, 224)}
#: text: the vocabulary of the default corpus (the bench reads no data); 93 characters
CLASSES = {"cifar100": 100, "imagefolder": 1000, "text": 93}

Step = Callable[[], None]


class _Info:
    """The parts of a data set's DataInfo that building a model reads (no data loaded)."""

    def __init__(self, name: str, block_size: int | None = None) -> None:
        self.name = name
        self.num_classes = CLASSES.get(name, 10)
        if name == "text":  # token ids (B, block) and one target per position
            self.in_channels, self.image_size = 1, int(block_size or 64)
            self.input_kind = "tokens"
        else:
            self.in_channels, self.image_size = SHAPES[name]
            self.input_kind = "image"


def _batch(cfg, info: _Info, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    bs = int(cfg.trainer.batch_size)
    if info.input_kind == "tokens":
        t = info.image_size
        x = torch.randint(0, info.num_classes, (bs, t), device=device)
        return x, torch.randint(0, info.num_classes, (bs * t,), device=device)
    x = torch.randn(bs, info.in_channels, info.image_size, info.image_size, device=device)
    return x, torch.randint(0, info.num_classes, (bs,), device=device)


def copy_conv_inputs(net: torch.nn.Module) -> None:
    """Make every convolution of ``net`` compute on a copy of its input: one more live tensor
    per layer, as fake quantization has (the float activation and its snapped copy), with no
    quantization work at all."""
    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d):
            m.register_forward_pre_hook(lambda _, args: (args[0] * 1.0, *args[1:]))


def make_steps(
    overrides: list[str], device: torch.device, compile_model: bool, copy_floor: bool = False
) -> dict[str, Step]:
    """Training-step closures of the float (``fp``) and the quantized (``quant``) network, and
    with ``copy_floor`` of the float network copying its convolutions' inputs (``fp+copy``)."""
    with initialize_config_module("qexp.conf", version_base=None):
        cfg = compose("config", overrides=overrides)
    spec = run_spec(cfg)
    info = _Info(cfg.dataset.name, cfg.dataset.get("block_size"))
    suffix = "+compile" if compile_model else ""
    settings = spec.trainer

    def float_step(copy_inputs: bool = False) -> Step:
        """A float network's training step (seed 0, the quantized net's optimizer settings)."""
        torch.manual_seed(0)
        net = build_net(spec.model, info).to(device).train()
        if copy_inputs:
            copy_conv_inputs(net)
        net_opt = build_optimizer(SimpleNamespace(net=net, estimator=Estimator()), settings)
        # plain torch.compile: the floor the quantized net is held to (qexp's own compile
        # path, used for the quantized net below, also swaps CPU ReLUs: qexp/train/compile.py)
        call = torch.compile(net) if compile_model else net

        def step() -> None:
            loss = F.cross_entropy(call(x), y)
            net_opt.zero_grad(set_to_none=True)
            loss.backward()
            net_opt.step()

        return step

    fp_step = float_step()
    x, y = _batch(cfg, info, device)  # the steps read the batch when they run
    copy_step = float_step(copy_inputs=True) if copy_floor else None

    torch.manual_seed(0)
    model = build_model(spec, info, device, total_steps=1000)
    # the trainer's own step (qexp/train/step.py): estimator schedule, LR, loss, backward,
    # optimizer, quantizer clamps, weight-range refresh; its first call is the calibration
    # phase, and with compile on, its second call compiles as `qexp train` does
    quant_train = TrainStep(
        model,
        build_optimizer(model, settings),
        ConstantLR(),
        dataclasses.replace(settings, compile="on" if compile_model else "off", grad_clip=None),
        device,
    )
    count = [0]

    def quant_step() -> None:
        quant_train(x, y, count[0], 1000)
        count[0] += 1

    model.train()
    quant_step()  # the calibration step, eagerly, as in the trainer
    steps = {f"fp{suffix}": fp_step, f"quant{suffix}": quant_step}
    return steps if copy_step is None else {**steps, "fp+copy": copy_step}


def time_steps(step: Step, n: int, device: torch.device, clock=time.perf_counter) -> float:
    """Seconds per step over ``n`` steps."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = clock()
    for _ in range(n):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (clock() - t0) / n


def graph_breaks() -> int:
    """Graph breaks torch.compile has met so far in this process."""
    from torch._dynamo.utils import counters

    return sum(counters["graph_break"].values())


def bench_model(
    model: str, overrides: list[str], args: argparse.Namespace, device: torch.device
) -> None:
    """Time the variants of one model in interleaved rounds and print times and ratios."""
    base = [f"model={model}", f"dataset={MODELS[model]}", *overrides]
    steps = make_steps(base, device, compile_model=False, copy_floor=args.copy_floor)
    breaks = None
    if args.compile:
        before = graph_breaks()
        steps.update(make_steps(base, device, compile_model=True))
        for step in steps.values():  # warm-up; compiles the compiled variants
            time_steps(step, 2, device)
        breaks = graph_breaks() - before
    for step in steps.values():
        time_steps(step, 2, device)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name, step in steps.items():
            times[name].append(time_steps(step, args.steps, device, clock))
    print(f"\n{model} ({MODELS[model]} shapes), overrides {overrides or '-'}")
    for name, ts in times.items():
        print(f"  {name:15s} {statistics.median(ts) * 1e3:9.2f} ms/step ({args.clock})")
    pairs = [("quant", "fp", 1.10)]
    if args.copy_floor:
        pairs.append(("fp+copy", "fp", None))
    if args.compile:
        pairs += [("fp+compile", "fp", None), ("quant+compile", "fp", 1.0),
                  ("quant+compile", "fp+compile", 1.15)]
    for num, den, target in pairs:
        r = [a / b for a, b in zip(times[num], times[den], strict=True)]
        goal = f"  (target <= {target:.2f})" if target else ""
        print(f"  {num:>13s} / {den:<10s} {statistics.median(r):6.3f}  "
              f"[per-round min {min(r):.3f}, max {max(r):.3f}]{goal}")
    if breaks is not None:
        print(f"  graph breaks while compiling: {breaks}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS),
                        help=f"comma-separated, from {', '.join(MODELS)}")
    parser.add_argument("--rounds", type=int, default=11, help="interleaved rounds")
    parser.add_argument("--steps", type=int, default=5, help="training steps per variant a round")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--clock", choices=("auto", "cpu", "wall"), default="auto",
                        help="cpu: CPU time of this process (robust on a machine shared with "
                        "other work); wall: elapsed time; auto: cpu on CPU devices, else wall")
    parser.add_argument("--no-compile", dest="compile", action="store_false",
                        help="eager variants only")
    parser.add_argument("--copy-floor", action="store_true",
                        help="also time the float net with a copy of every convolution's input "
                        "(fp+copy): the cost of one more live tensor per layer, no quantization")
    parser.add_argument("overrides", nargs="*", help="config overrides for the quantized net")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    register_schemas()
    device = resolve_device(args.device)
    if args.clock == "auto":
        args.clock = "cpu" if device.type == "cpu" else "wall"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"device {device}, threads {torch.get_num_threads()}, torch {torch.__version__}, "
          f"{args.rounds} rounds x {args.steps} steps, {args.clock} clock, load average {load:.1f} "
          f"on {os.cpu_count()} cores")
    for model in args.models.split(","):
        if model not in MODELS:
            parser.error(f"--models: {model!r} is not one of {', '.join(MODELS)}")
        bench_model(model, args.overrides, args, device)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"\nload average at the end: {load:.1f}")


if __name__ == "__main__":
    main()
