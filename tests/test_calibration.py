"""Calibration is a phase: quantizers take data-derived state only where the phase says."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qexp.quant.calibrate import calibrate, calibration, set_observing, uncalibrated
from qexp.quant.lsq import LSQQuantizer
from qexp.quant.pact import PACTQuantizer
from qexp.quant.uniform import UniformQuantizer
from qexp.quant.wrap import LayerBits, quantize_model


def _net(body):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    quantize_model(net, body, lambda r, b: UniformQuantizer(b, r), LayerBits(4, 4), 8, 8)
    return net.train()


def _count_observe(monkeypatch, cls):
    calls = []
    original = cls.observe

    def counting(self, x):
        calls.append(self)
        return original(self, x)

    monkeypatch.setattr(cls, "observe", counting)
    return calls


def test_asking_for_a_grid_never_calibrates():
    q = UniformQuantizer(4, "activation")
    with pytest.raises(RuntimeError, match="calibration"):
        q.hard(torch.rand(10))
    assert not q.is_calibrated() and float(q.range) == 0.0
    lsq = LSQQuantizer(4, "weight")
    with pytest.raises(RuntimeError, match="calibration"):
        lsq.grid(torch.randn(4, 4))
    assert float(lsq.step.detach()) == 1.0  # untouched


def test_calibration_phase_observes_once_then_only_trackers(monkeypatch):
    calls = _count_observe(monkeypatch, LSQQuantizer)
    net = _net(lambda role, bits: LSQQuantizer(bits, role))
    x = torch.randn(5, 6)
    with pytest.raises(RuntimeError, match="calibration"):
        net(x)  # observers are off by default: no silent calibration on this batch
    assert calls == [] and uncalibrated(net) == ['0.a_quant', '2.w_quant', '2.a_quant', '4.a_quant']
    with calibration(net):
        net(x)
    assert len(calls) == 2 and not uncalibrated(net)  # the body layer's weight and input
    step = net[2].a_quant.step.detach().clone()
    h = torch.relu(net[0](x)).detach()
    assert float(step) == pytest.approx(float(2 * h.abs().mean() / 15**0.5), rel=1e-5)
    # after the phase: LSQ no longer observes, the uniform edge activations keep tracking
    assert not net[2].a_quant.observing and not net[2].w_quant.observing
    assert net[0].a_quant.observing and net[4].a_quant.observing
    for _ in range(3):
        net(torch.randn(5, 6) * 10)
    assert len(calls) == 2 and torch.equal(net[2].a_quant.step.detach(), step)


def test_evaluation_and_off_phase_never_observe(monkeypatch):
    calls = _count_observe(monkeypatch, UniformQuantizer)
    net = _net(lambda role, bits: UniformQuantizer(bits, role))
    with calibration(net):
        net(torch.randn(5, 6))
    n = len(calls)
    rng = net[2].a_quant.range.clone()
    net.eval()
    net(torch.randn(5, 6) * 100)
    assert len(calls) == n and torch.equal(net[2].a_quant.range, rng)
    net.train()
    set_observing(net, "off")
    net(torch.randn(5, 6) * 100)
    assert len(calls) == n


def test_a_quantizer_the_forward_never_reaches_is_reported():
    net = _net(lambda role, bits: PACTQuantizer(bits, role) if role == "activation" else None)
    with pytest.raises(RuntimeError, match="saw no data"), calibration(net):
        pass  # no forward at all


def test_calibrate_helper_leaves_batchnorm_statistics_alone():
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3),
                        nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(16, 2))  # fmt: skip
    quantize_model(net, lambda r, b: UniformQuantizer(b, r), lambda r, b: UniformQuantizer(b, r),
                   LayerBits(4, 4), 8, 8)  # fmt: skip
    before = {k: v.clone() for k, v in net.state_dict().items() if "running" in k}
    net.eval()
    calibrate(net, torch.randn(8, 1, 6, 6))
    assert not net.training and not uncalibrated(net)
    for k, v in before.items():
        assert torch.equal(net.state_dict()[k], v), k


@pytest.mark.slow
def test_the_trainer_calibrates_on_its_first_batch_only(monkeypatch, cfg_train, tmp_path):
    from qexp.train.run import build_run, run_spec
    from qexp.train.trainer import Trainer

    calls = _count_observe(monkeypatch, LSQQuantizer)
    parts = build_run(run_spec(cfg_train("quantizer=lsq", "trainer.epochs=2")), tmp_path)
    n_lsq = sum(isinstance(m, LSQQuantizer) for m in parts.model.modules())
    assert n_lsq > 0 and calls == []  # building the run calibrates nothing
    metrics = Trainer(parts).fit()
    assert metrics["status"] == "completed"
    assert len(calls) == n_lsq and len(set(map(id, calls))) == n_lsq  # each once, step 0
