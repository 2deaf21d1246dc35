"""torch.compile of the training forward: one graph, eager-equal results, eager fallback."""

from __future__ import annotations

import pytest
import torch
from conftest import FAST, compose_config, read_metrics, run_qexp

from qexp.quant.calibrate import calibration
from qexp.quant.layers import refresh_weight_ranges
from qexp.train.compile import OutputMaskReLU, compiled, use_output_mask_relus, wants_compile
from qexp.train.run import build_model, run_spec

COMMON = [*FAST, "trainer.epochs=3"]


@pytest.mark.parametrize(
    "overrides",
    [
        [], ["quantizer=lsq"], ["quantizer=dq_u3", "estimator=clipped_ste"],
        pytest.param(["model=resnet20"], marks=pytest.mark.slow),  # a deep net: seconds to trace
    ],
)  # fmt: skip
def test_quantized_training_forward_is_one_graph(overrides):
    """No host sync, no Python branch on tensor values: dynamo captures the whole network."""
    cfg = compose_config("dataset=digits", *overrides)

    class Info:
        in_channels, image_size, num_classes = 1, 8, 10

    model = build_model(run_spec(cfg), Info(), torch.device("cpu"), total_steps=10)
    x = torch.randn(4, 1, 8, 8)
    model.train()
    with calibration(model):
        model(x).sum().backward()
    refresh_weight_ranges(model, 1)
    explained = torch._dynamo.explain(model)(x)
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
    assert explained.graph_count == 1


def test_output_mask_relu_has_relus_values_and_gradients():
    """Against autograd through torch.relu: values and input gradients, zeros and ties
    included (sign(0) must give a zero gradient, as relu's backward does at 0)."""
    x = torch.tensor([-2.0, -0.0, 0.0, 1e-30, 0.5, 3.0]).repeat(3, 1) * torch.randn(3, 1).abs()
    upstream = torch.randn_like(x)
    ref_in = x.clone().requires_grad_(True)
    torch.relu(ref_in).backward(upstream)
    ours_in = x.clone().requires_grad_(True)
    out = OutputMaskReLU()(ours_in)
    out.backward(upstream)
    torch.testing.assert_close(out, torch.relu(x), rtol=0, atol=0)
    torch.testing.assert_close(ours_in.grad, ref_in.grad, rtol=0, atol=0)


def test_cpu_compile_swaps_plain_relus_only():
    """compiled() on CPU swaps every plain nn.ReLU (not other activations) and leaves the
    parameters and buffers, hence checkpoints, as they were."""
    net = torch.nn.Sequential(
        torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Sequential(torch.nn.ReLU(inplace=True)),
        torch.nn.Hardtanh(), torch.nn.Linear(4, 2),
    )  # fmt: skip
    keys = list(net.state_dict())
    x = torch.randn(8, 4)
    before = net(x)
    compiled(net, torch.device("cpu"))
    kinds = [type(m) for m in net.modules()]
    assert kinds.count(OutputMaskReLU) == 2 and torch.nn.ReLU not in kinds
    assert torch.nn.Hardtanh in kinds
    assert list(net.state_dict()) == keys
    torch.testing.assert_close(net(x), before, rtol=0, atol=0)
    assert use_output_mask_relus(net) == 0  # already swapped: nothing left to do
    on_gpu = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())
    compiled(on_gpu, torch.device("cuda"))  # lazy: nothing runs on the device here
    assert type(on_gpu[1]) is torch.nn.ReLU  # CUDA keeps its byte masks (4x smaller)


def test_compile_modes():
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert not wants_compile("off", cpu) and not wants_compile("off", gpu)
    assert not wants_compile("auto", cpu)  # CPU: compiling costs more than a short run saves
    assert not wants_compile("auto", torch.device("mps"))
    assert not wants_compile("on", torch.device("mps"))
    with pytest.raises(ValueError, match="trainer.compile"):
        wants_compile("yes", cpu)


@pytest.mark.slow
def test_compiled_step_matches_eager_within_float_noise():
    """One training step from the same state: logits and gradients agree to float rounding.

    The MLP, because max-pooling makes a CNN's gradients legitimately differ: convolutions of
    grid values tie often, and eager and compiled max-pool send the gradient to different tied
    positions (measured: 0.3% of the gradient norm below the small CNN's pooled stage).
    """
    cfg = compose_config("dataset=digits", "model=mlp")

    class Info:
        in_channels, image_size, num_classes = 1, 8, 10

    torch.manual_seed(0)
    model = build_model(run_spec(cfg), Info(), torch.device("cpu"), total_steps=10)
    x, y = torch.randn(32, 1, 8, 8), torch.randint(0, 10, (32,))
    model.train()
    with calibration(model):
        model(x)
    start = {k: v.clone() for k, v in model.state_dict().items()}

    def step(forward):
        model.load_state_dict(start)
        model.zero_grad(set_to_none=True)
        logits = forward(x)
        torch.nn.functional.cross_entropy(logits, y).backward()
        return logits.detach(), [p.grad.clone() for p in model.parameters()]

    eager_logits, eager_grads = step(model)
    comp_logits, comp_grads = step(compiled(model))
    torch.testing.assert_close(comp_logits, eager_logits, rtol=1e-5, atol=1e-6)
    for a, b in zip(comp_grads, eager_grads, strict=True):
        assert float((a - b).norm() / b.norm().clamp(min=1e-12)) < 1e-5


@pytest.mark.slow
def test_compiled_training_matches_eager_on_digits(tmp_path):
    run_qexp("train", *COMMON, "trainer.compile=off", f"hydra.run.dir={tmp_path / 'e'}",
             cwd=tmp_path)  # fmt: skip
    run_qexp("train", *COMMON, "trainer.compile=on", f"hydra.run.dir={tmp_path / 'c'}",
             cwd=tmp_path, timeout=900)  # fmt: skip
    eager, comp = read_metrics(tmp_path / "e"), read_metrics(tmp_path / "c")
    assert comp["compiled"] is True and eager["compiled"] is False
    assert comp["config_hash"] == eager["config_hash"]  # compile does not change the run
    # Rounding onto 4-bit grids turns float-rounding differences into occasional different
    # levels, which training carries on: close, not equal, over epochs.
    for a, b in zip(eager["history"], comp["history"], strict=True):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=0.03)
    assert abs(comp["test_acc"] - eager["test_acc"]) <= 0.02


@pytest.mark.slow
def test_failing_compile_warns_once_and_trains_eagerly(tmp_path):
    run_qexp("train", *COMMON, "trainer.compile=off", f"hydra.run.dir={tmp_path / 'e'}",
             cwd=tmp_path)  # fmt: skip
    # a C++ compiler that always fails: inductor cannot build its CPU kernels
    env = {"CXX": "/bin/false", "TORCHINDUCTOR_FORCE_DISABLE_CACHES": "1"}
    proc = run_qexp("train", *COMMON, "trainer.compile=on", f"hydra.run.dir={tmp_path / 'f'}",
                    cwd=tmp_path, env=env, timeout=900)  # fmt: skip
    warnings = [ln for ln in (proc.stdout + proc.stderr).splitlines() if "trainer.compile" in ln]
    assert len(warnings) == 1 and "training eagerly" in warnings[0]
    eager, fell_back = read_metrics(tmp_path / "e"), read_metrics(tmp_path / "f")
    assert fell_back["compiled"] is False and fell_back["status"] == "completed"
    # the failed step was undone and redone eagerly: the same run as an eager one
    assert fell_back["history"] == eager["history"]
    assert fell_back["test_acc"] == eager["test_acc"]
