"""AQE: exact stand-in gradients, convergence to the hard quantizer, 1-bit training, CLI."""

import json
import math
import sys

import pytest
import torch
from conftest import FAST, compose_config
from torch import nn

from qexp.cli import main
from qexp.curves import Constant
from qexp.estimators.aqe import AQE, stand_in
from qexp.quant.base import Grid
from qexp.quant.binary import BinaryQuantizer
from qexp.quant.calibrate import calibration
from qexp.quant.layers import QLinear
from qexp.quant.refs import keep_reference
from qexp.quant.uniform import UniformQuantizer
from qexp.train.inspect_levels import layer_table


def reference_stand_in(x, grid, beta):
    """The tanh staircase written out independently: all midpoints stacked in a last dim."""
    step = torch.as_tensor(grid.step).to(x.dtype)
    low = grid.offset * step
    k = torch.arange(grid.num_levels - 1, dtype=step.dtype)
    mids = low[..., None] + (k + 0.5) * step[..., None]  # (..., n - 1)
    terms = (1 + torch.tanh(beta * (x[..., None] - mids) / step[..., None])) / 2
    return low + step * terms.sum(dim=-1)


def _layer(est, w_quant, a_quant, n_in=16, n_out=6):
    torch.manual_seed(0)
    layer = QLinear.from_float(nn.Linear(n_in, n_out), w_quant, a_quant, "body")
    keep_reference(layer, "estimator", est)
    return layer


QUANTS = {
    "uniform2": lambda: (UniformQuantizer(2, "weight"), UniformQuantizer(2, "activation")),
    "uniform1": lambda: (UniformQuantizer(1, "weight"), UniformQuantizer(1, "activation")),
    "uniform3_signed": lambda: (
        UniformQuantizer(3, "weight", signed_grid="narrow"),
        UniformQuantizer(3, "activation", signed=True),
    ),
    "binary": lambda: (BinaryQuantizer(1, "weight"), BinaryQuantizer(1, "activation")),
}


@pytest.mark.parametrize("quant", list(QUANTS))
@pytest.mark.parametrize("beta", [1.0, 7.5, 60.0])
def test_gradient_is_autograd_of_the_written_out_stand_in(quant, beta):
    est = AQE(beta=Constant(beta), beta_max=None)
    est.step(0.5)
    layer = _layer(est, *QUANTS[quant]()).double()
    # float64 throughout, so both computations agree to rounding even at large beta
    w = (layer.weight.detach() * 3).requires_grad_(True)
    x = torch.randn(32, 16, dtype=torch.float64, requires_grad=True)
    layer.a_quant.observe(x.detach())
    for t, quantizer, out in (
        (w, layer.w_quant, est.weight(layer, w)),
        (x, layer.a_quant, est.activation(layer, x)),
    ):
        g = torch.randn_like(t)
        (out * g).sum().backward()
        ref_t = t.detach().clone().requires_grad_(True)
        grid = quantizer.grid(t.detach())
        ref = reference_stand_in(ref_t, grid, beta)
        (ref * g).sum().backward()
        torch.testing.assert_close(out, ref)
        torch.testing.assert_close(t.grad, ref_t.grad)


def test_learned_step_gets_the_stand_ins_gradient():
    x = torch.randn(50)
    step = torch.tensor(0.4, requires_grad=True)
    stand_in(x, Grid(-1.5, step, 4), 3.0).pow(2).sum().backward()
    step_ref = torch.tensor(0.4, requires_grad=True)
    reference_stand_in(x, Grid(-1.5, step_ref, 4), 3.0).pow(2).sum().backward()
    torch.testing.assert_close(step.grad, step_ref.grad)


def test_one_bit_form_is_scaled_tanh():
    a = torch.tensor(0.7)
    x = torch.linspace(-3, 3, 101)
    out = stand_in(x, Grid(-0.5, 2 * a, 2), 5.0)
    torch.testing.assert_close(out, a * torch.tanh(5.0 * x / (2 * a)))


@pytest.mark.parametrize("offset,levels", [(-0.5, 2), (-1.5, 4), (0.0, 4), (-3.0, 7), (0.0, 16)])
def test_stand_in_converges_to_the_hard_quantizer(offset, levels):
    step = torch.tensor(0.3)
    grid = Grid(offset, step, levels)
    low, high = grid.low.item(), (offset + levels - 1) * step.item()
    x = torch.linspace(low - 2 * step.item(), high + 2 * step.item(), 20001)
    u = x / step - offset  # midpoints sit at u = k + 1/2
    far = ((u - torch.floor(u) - 0.5).abs() >= 0.05) | (u < 0) | (u > levels - 1)
    x = x[far]
    hard = grid.snap(x)
    errs = [float((stand_in(x, grid, b) - hard).abs().max()) for b in (2, 8, 32, 128, 512)]
    assert all(e1 > e2 for e1, e2 in zip(errs, errs[1:], strict=False) if e1 > 0)
    # error at distance 0.05 steps from a midpoint is about step * exp(-2 * beta * 0.05)
    assert errs[3] < step.item() * 3 * math.exp(-2 * 128 * 0.05)
    assert errs[-1] < 1e-6


def test_hard_after_beta_max_forwards_hard_values_with_the_stand_ins_gradient():
    est = AQE(beta=Constant(500.0), beta_max=100.0, hard_after_beta_max=True)
    assert est.step(0.3) == {"beta": 100.0}
    layer = _layer(est, BinaryQuantizer(1, "weight"), BinaryQuantizer(1, "activation"))
    x = torch.randn(8, 16)
    x[0, :3] = 0.0  # sign(0) = +1 exactly as the quantizer's hard
    x.requires_grad_(True)
    out = est.activation(layer, x)
    assert torch.equal(out, layer.a_quant.hard(x))
    out.sum().backward()
    ref_x = x.detach().clone().requires_grad_(True)
    reference_stand_in(ref_x, layer.a_quant.grid(ref_x), 100.0).sum().backward()
    torch.testing.assert_close(x.grad, ref_x.grad)
    # without the switch the cap still holds but the forward is the stand-in
    soft = AQE(beta=Constant(500.0), beta_max=100.0, hard_after_beta_max=False)
    soft.step(0.3)
    assert not torch.equal(soft.activation(layer, x), layer.a_quant.hard(x))


def test_training_forward_calibrates_activation_range_first():
    est = AQE(beta=Constant(4.0), beta_max=None)
    est.step(0.0)
    layer = _layer(est, UniformQuantizer(2, "weight"), UniformQuantizer(2, "activation"))
    assert not bool(layer.a_quant.calibrated)
    x = torch.relu(torch.randn(16, 16))
    layer.train()
    with calibration(layer):
        layer(x)  # QuantLayer.quant_input observes before calling the estimator
    assert bool(layer.a_quant.calibrated) and float(layer.a_quant.range) > 0


def test_beta_state_round_trips_and_defaults_follow_the_yaml():
    from qexp.train.build import instantiate

    cfg = compose_config("estimator=aqe")
    est = instantiate(cfg.estimator, "estimator")
    assert isinstance(est, AQE) and est.has_soft_forward
    curve = cfg.schedule.beta
    assert est.step(0.0)["beta"] == pytest.approx(curve.start)
    mid = est.step(0.5)["beta"]
    assert curve.start < mid < curve.end
    other = instantiate(cfg.estimator, "estimator")
    other.load_state_dict(est.state_dict())
    assert other.state_summary() == est.state_summary()
    end = est.step(1.0)
    assert end["beta"] == pytest.approx(min(curve.end, cfg.estimator.beta_max))


def _train_digits(tmp_path, overrides):
    """A one-epoch digits run in process; returns the trained (best) model and a test batch."""
    from qexp.train.run import build_run, run_spec
    from qexp.train.trainer import Trainer

    cfg = compose_config(*FAST, "trainer.epochs=1", *overrides)
    parts = build_run(run_spec(cfg), tmp_path)
    metrics = Trainer(parts).fit()
    x, _ = next(iter(parts.data.eval_batches("test", 256, torch.device("cpu"))))
    return parts.model, x, metrics


@pytest.mark.slow
@pytest.mark.parametrize("quantizer", ["uniform", "binary"])
def test_w1a1_deployed_layers_are_binary(tmp_path, quantizer):
    model, x, metrics = _train_digits(
        tmp_path, ["estimator=aqe", "bits=1", f"quantizer={quantizer}"]
    )
    assert metrics["status"] == "completed"
    table = {row["name"]: row for row in layer_table(model.net, x)}
    body = [(n, m) for n, m in model.layers() if m.layer_role == "body"]
    assert body
    for name, layer in body:
        levels = table[name]["levels"]
        assert levels["weight"] == 2 and levels["activation"] <= 2
        w = layer.w_quant.hard(layer.weight).reshape(layer.weight.shape[0], -1)
        scale = w.abs().amax(dim=1, keepdim=True)
        assert torch.equal(w.abs(), scale.expand_as(w))  # every channel is +-its scale


@pytest.mark.slow
def test_cli_aqe_end_to_end(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    # in process (the `qexp` console script's own entry), so imports are paid once per session
    monkeypatch.setattr(sys, "argv", ["qexp"])
    args = ["train", "estimator=aqe", "bits=1", *FAST, "trainer.epochs=2",
            f"hydra.run.dir={run_dir}"]  # fmt: skip
    assert main(args) == 0
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "completed"
    assert metrics["test_acc"] >= 0.2  # 10 classes: twice chance after 2 short epochs
    # at the end of training the sharpened stand-in and the deployed network nearly agree
    assert abs(metrics["test_acc_soft"] - metrics["test_acc"]) <= 0.15
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    assert "train/beta" in acc.Tags()["scalars"]
    betas = [e.value for e in acc.Scalars("train/beta")]
    assert betas[0] == pytest.approx(1.0) and betas[-1] > betas[0]


def test_soft_evaluation_measures_the_stand_in_even_after_the_hard_switch():
    est = AQE(beta=Constant(3.0), beta_max=3.0, hard_after_beta_max=True)
    est.step(1.0)  # beta reached beta_max: training forwards hard values
    layer = _layer(est, UniformQuantizer(2, "weight"), UniformQuantizer(2, "activation"))
    w = layer.weight
    hard = layer.w_quant.hard(w)
    layer.train()
    torch.testing.assert_close(est.weight(layer, w), hard)
    layer.eval()  # the trainer's soft evaluation: quant_mode "soft" outside training
    soft = est.weight(layer, w)
    expected = reference_stand_in(w.detach().double(), layer.w_quant.grid(w), 3.0).float()
    torch.testing.assert_close(soft, expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(soft, hard)


@pytest.mark.parametrize("bits", [2, 3])
def test_dorefa_weights_get_a_stand_in_of_their_own_levels(bits):
    from qexp.quant.dorefa import DoReFaQuantizer

    torch.manual_seed(bits)
    q = DoReFaQuantizer(bits, "weight")
    w = (torch.randn(64, 32, 3, 3) * 0.05).requires_grad_(True)
    est = AQE(beta=Constant(2000.0), beta_max=None)
    est.step(0.5)
    soft = est.soft(q, w)
    hard = q.hard(w.detach())
    # at a very large beta the stand-in is the quantizer, weight by weight, except within a
    # hair of a rounding midpoint (there it is halfway between two levels by design)
    grid = q.grid(w)
    pos = q.grid_input(w.detach()) / grid.step - grid.offset  # level index, continuous
    clear = ((pos - pos.floor()) - 0.5).abs() > 0.01
    assert float(clear.float().mean()) > 0.97
    torch.testing.assert_close(soft.detach()[clear], hard[clear], rtol=0, atol=1e-5)
    # and its gradient is autograd of the written-out stand-in of tanh(w) / max|tanh(w)|
    est_small = AQE(beta=Constant(3.0), beta_max=None)
    est_small.step(0.5)
    g = torch.randn_like(w)
    (est_small.soft(q, w) * g).sum().backward()
    wr = w.detach().clone().requires_grad_(True)
    t = torch.tanh(wr)
    ref = reference_stand_in(t / t.abs().max(), q.grid(wr), 3.0)
    (ref * g).sum().backward()
    torch.testing.assert_close(w.grad, wr.grad, rtol=1e-4, atol=1e-6)


def test_activations_through_ste_option():
    wq, aq = UniformQuantizer(2, "weight"), UniformQuantizer(2, "activation")
    est = AQE(beta=Constant(5.0), beta_max=None, activations="ste")
    est.step(0.5)
    layer = _layer(est, wq, aq)
    x = torch.relu(torch.randn(8, 16)) * 2
    aq.observe(x)
    xg = x.clone().requires_grad_(True)
    out = est.activation(layer, xg)
    gx = torch.randn_like(x)
    (out * gx).sum().backward()
    torch.testing.assert_close(out.detach(), aq.hard(x))
    torch.testing.assert_close(xg.grad, gx)  # straight-through: the identity
    w = layer.weight.detach().clone().requires_grad_(True)
    (est.weight(layer, w)).sum().backward()  # weights still through the stand-in
    wr = w.detach().clone().requires_grad_(True)
    reference_stand_in(wr, wq.grid(wr), 5.0).sum().backward()
    torch.testing.assert_close(w.grad, wr.grad)
    with pytest.raises(ValueError, match="stand_in | ste"):
        AQE(activations="sometimes")
