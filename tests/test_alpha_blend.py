"""Alpha-blending: gradient scaling, alpha = 1 equals the hard network, curves, buffers, CLI."""

import json
import sys

import pytest
import torch
from conftest import FAST, compose_config
from torch import nn

from qexp.cli import main
from qexp.curves import Ramp
from qexp.estimators.alpha_blend import AlphaBlend
from qexp.estimators.base import EstimatorContext
from qexp.estimators.model import QuantModel
from qexp.quant.binary import BinaryQuantizer
from qexp.quant.calibrate import calibration
from qexp.quant.layers import QLinear, quant_mode
from qexp.quant.refs import keep_reference
from qexp.quant.uniform import UniformQuantizer
from qexp.quant.wrap import LayerBits, attach_estimator, quantize_model


def _uniform(role, bits):
    return UniformQuantizer(bits, role) if bits < 32 else None


def _binary(role, bits):
    return BinaryQuantizer(1, role)


def _model(est, body=_uniform, bits=4, act=nn.ReLU, edge_bits=8):
    """A BN-free MLP with two body layers, wrapped like qexp's build_model does."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Linear(12, 24), act(), nn.Linear(24, 24), act(), nn.Linear(24, 24), act(),
        nn.Linear(24, 5),
    )  # fmt: skip
    quantize_model(
        net, body, _uniform, LayerBits(bits, bits), first_bits=edge_bits, last_bits=edge_bits
    )
    model = QuantModel(net, est)
    attach_estimator(net, est)
    est.attach(model, EstimatorContext(total_steps=10, device=torch.device("cpu")))
    return model


def _body_layer(est, blend_activations=False):
    lin = QLinear.from_float(
        nn.Linear(16, 4),
        UniformQuantizer(2, "weight"),
        UniformQuantizer(2, "activation", signed=True),
        "body",
    )
    keep_reference(lin, "estimator", est)
    return lin


@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.7, 1.0])
def test_gradient_is_one_minus_alpha_times_upstream(alpha):
    torch.manual_seed(1)
    est = AlphaBlend(blend_activations=True)
    est.alpha.fill_(alpha)
    layer = _body_layer(est)
    w = layer.weight.detach().clone().requires_grad_(True)
    g = torch.randn_like(w)
    wab = est.weight(layer, w)
    (wab * g).sum().backward()
    torch.testing.assert_close(w.grad, (1 - alpha) * g)
    a = torch.tensor(alpha)
    torch.testing.assert_close(wab, (1 - a) * w.detach() + a * layer.w_quant.hard(w))
    x = torch.randn(8, 16, requires_grad=True)
    layer.a_quant.observe(x.detach())
    gx = torch.randn_like(x)
    (est.activation(layer, x) * gx).sum().backward()
    torch.testing.assert_close(x.grad, (1 - alpha) * gx)


def test_activations_use_ste_by_default():
    est = AlphaBlend()
    est.alpha.fill_(0.5)
    layer = _body_layer(est)
    x = torch.randn(8, 16, requires_grad=True)
    layer.a_quant.observe(x.detach())
    y = est.activation(layer, x)
    torch.testing.assert_close(y, layer.a_quant.hard(x))
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.ones_like(x))


@pytest.mark.parametrize(
    "body,bits,act,blend_act",
    [(_uniform, 4, nn.ReLU, False), (_uniform, 2, nn.ReLU, True), (_binary, 1, nn.Hardtanh, True)],
)
def test_alpha_one_trains_the_hard_network(body, bits, act, blend_act):
    est = AlphaBlend(blend_activations=blend_act)
    model = _model(est, body, bits, act)
    x = torch.randn(32, 12)
    est.step(1.0)
    assert float(est.alpha) == 1.0 and est.is_final_form()
    model.train()
    with calibration(model):
        y_train = model(x)  # the calibration phase: sets the activation ranges used below
    model.eval()
    with torch.no_grad():
        y_hard = model(x)
        with quant_mode(model, "soft"):
            y_soft = model(x)
    assert torch.equal(y_train.detach(), y_hard)
    assert torch.equal(y_soft, y_hard)


def test_alpha_zero_trains_latent_weights():
    est = AlphaBlend()
    model = _model(est, edge_bits=32)  # full-precision edges: "latent" touches only the body
    x = torch.randn(32, 12)
    est.step(0.0)
    assert float(est.alpha) == 0.0 and not est.is_final_form()
    with torch.no_grad(), calibration(model):
        y_train = model.train()(x)
    with torch.no_grad():
        model.eval()
        with quant_mode(model, "latent"):
            y_latent = model(x)
    torch.testing.assert_close(y_train, y_latent)


@pytest.mark.parametrize("shape", ["cubic", "linear"])
def test_curves_hit_zero_at_p0_and_one_at_p1(shape):
    ramp = Ramp(start=0.0, end=1.0, p0=0.1, p1=0.7, shape=shape)
    assert ramp(0.0) == 0.0 and ramp(0.1) == 0.0
    assert ramp(0.7) == 1.0 and ramp(0.9) == 1.0
    mid = ramp(0.4)
    assert 0.0 < mid < 1.0
    # cubic rises fast at first: above the linear ramp in the middle
    assert mid == pytest.approx(0.875 if shape == "cubic" else 0.5)


def test_default_yaml_curve_and_validation():
    from qexp.train.build import instantiate

    cfg = compose_config("estimator=alpha_blend")
    est = instantiate(cfg.estimator, "estimator")
    assert isinstance(est, AlphaBlend) and not est.blend_activations
    curve = est.alpha_curve
    assert (curve.shape, curve.p0, curve.p1) == ("cubic", 0.0, 0.8)
    with pytest.raises(ValueError, match="p1"):
        AlphaBlend(Ramp(p1=1.2))
    with pytest.raises(ValueError, match="exactly 1"):
        AlphaBlend(Ramp(end=0.9))


def test_last_step_forces_alpha_one():
    est = AlphaBlend(Ramp(p0=0.0, p1=1.0, shape="linear"))
    est.attach(nn.Module(), EstimatorContext(total_steps=4, device=torch.device("cpu")))
    assert est.step(2 / 4)["alpha"] == 0.5
    assert not est.is_final_form()
    assert est.step(3 / 4)["alpha"] == 1.0  # the last step of 4
    assert est.is_final_form()


def test_alpha_buffer_round_trips_through_state_dict():
    est = AlphaBlend()
    assert est.step(0.37)["alpha"] == pytest.approx(1 - (1 - 0.37 / 0.8) ** 3)
    state = est.state_dict()
    assert "alpha" in state
    other = AlphaBlend()
    other.load_state_dict(state)
    assert float(other.alpha) == float(est.alpha) and other.state_summary() == est.state_summary()
    assert not other.is_final_form()


def _scalar_tags(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    return acc, set(acc.Tags()["scalars"])


@pytest.mark.slow
def test_cli_alpha_blend_end_to_end(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    # in process (the `qexp` console script's own entry), so imports are paid once per session
    monkeypatch.setattr(sys, "argv", ["qexp"])
    args = ["train", "estimator=alpha_blend", "bits=4", *FAST, "trainer.epochs=2",
            f"hydra.run.dir={run_dir}"]  # fmt: skip
    assert main(args) == 0
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "completed"
    assert metrics["test_acc"] >= 0.2  # 10 classes: twice chance after 2 short epochs
    assert metrics["alpha"] == 1.0 and metrics["best_epoch"] == 2
    acc, tags = _scalar_tags(run_dir)
    assert "train/alpha" in tags
    alphas = [e.value for e in acc.Scalars("train/alpha")]
    assert alphas[0] == 0.0 and alphas[-1] == 1.0
    assert all(a <= b for a, b in zip(alphas, alphas[1:], strict=False))
