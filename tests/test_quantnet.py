"""QuantNet-style meta quantizer: autograd through the written-out formula, deployment levels."""

from __future__ import annotations

import contextlib
import json

import pytest
import torch
import torch.nn.functional as F
from conftest import FAST, read_metrics, run_qexp
from torch import nn

from qexp.estimators.base import EstimatorContext
from qexp.estimators.quantnet import QuantNet, hard_level, soft_staircase
from qexp.quant.calibrate import calibration
from qexp.quant.layers import QConv2d, QLinear, quant_layers
from qexp.quant.refs import keep_reference
from qexp.quant.uniform import UniformQuantizer
from qexp.train.inspect_levels import layer_table


def _layers(bits: int) -> list:
    torch.manual_seed(0)
    return [
        QConv2d.from_float(
            nn.Conv2d(3, 6, 3, padding=1), UniformQuantizer(bits, "weight"), None, "body"
        ),
        QLinear.from_float(nn.Linear(24, 5), UniformQuantizer(bits, "weight"), None, "body"),
    ]


def _attach(est: QuantNet, layers: list) -> nn.Module:
    holder = nn.ModuleList(layers)
    for m in layers:
        keep_reference(m, "estimator", est)
    est.attach(holder, EstimatorContext(total_steps=10, device=torch.device("cpu")))
    with torch.no_grad():  # leave the residual start, so the meta net's gradients are not trivial
        est.w_out.normal_(0.0, 0.5)
        est.b_out.normal_(0.0, 0.1)
    return holder


def _reference(est: QuantNet, idx: int, layer, w: torch.Tensor, gamma: float) -> torch.Tensor:
    """The training weight written out from the meta net's parameters (no library helpers)."""
    k = 0 if est.share else idx
    std = w.std()
    x = w / std
    pre = x.unsqueeze(-1) * est.w_in[k] + est.b_in[k]
    if est.embedding is not None:
        pre = pre + est.w_embed[k] @ est.embedding[idx]
    g = x + torch.tanh(pre) @ est.w_out[k] + est.b_out[k]
    if layer.w_bits == 1:
        scale = w.abs().reshape(w.shape[0], -1).mean(dim=1).reshape((-1,) + (1,) * (w.dim() - 1))
        return scale * torch.tanh(gamma * g)
    grid = layer.w_quant.grid(w)  # the quantizer's grid: constants of this step
    n, step, offset = grid.num_levels, grid.step, grid.offset
    levels = [(offset + j) * step for j in range(n)]
    lo, hi = levels[0], levels[-1]
    center, half = (lo + hi) / 2, (hi - lo) / 2
    z = (g * std - center) / half
    staircase = torch.full_like(z, -1.0)
    for j in range(1, n):
        mid = -1.0 + (2 * j - 1) / (n - 1)
        staircase = staircase + (1 + torch.tanh(gamma * (n - 1) * (z - mid))) / (n - 1)
    return center + half * staircase


@pytest.mark.parametrize(
    "bits,share,embed_dim", [(1, True, 0), (1, False, 3), (2, True, 2), (3, False, 0)]
)
def test_weight_gradient_equals_autograd_of_written_out_network(bits, share, embed_dim):
    est = QuantNet(gamma=3.0, hidden=8, share=share, embed_dim=embed_dim)
    layers = _layers(bits)
    _attach(est, layers)
    for idx, layer in enumerate(layers):
        w = layer.weight.detach().clone().requires_grad_(True)
        g_out = torch.randn_like(w)
        est.zero_grad()
        (est.weight(layer, w) * g_out).sum().backward()
        grads = {
            "w": w.grad.clone(),
            "w_in": est.w_in.grad.clone(),
            "w_out": est.w_out.grad.clone(),
        }
        if embed_dim:
            grads["embedding"] = est.embedding.grad.clone()
        w_ref = w.detach().clone().requires_grad_(True)
        est.zero_grad()
        ref = _reference(est, idx, layer, w_ref, 3.0)
        torch.testing.assert_close(est.weight(layer, w_ref.detach()), ref.detach())
        (ref * g_out).sum().backward()
        torch.testing.assert_close(grads["w"], w_ref.grad)
        torch.testing.assert_close(grads["w_in"], est.w_in.grad)
        torch.testing.assert_close(grads["w_out"], est.w_out.grad)
        if embed_dim:
            torch.testing.assert_close(grads["embedding"], est.embedding.grad)
        assert grads["w"].abs().sum() > 0 and grads["w_in"].abs().sum() > 0


def test_one_bit_deployed_weights_are_scale_times_sign_of_soft_output():
    est = QuantNet(gamma=2.0, hidden=8)
    layers = _layers(1)
    _attach(est, layers)
    for idx, layer in enumerate(layers):
        layer.eval()
        w = layer.weight.detach()
        soft = _reference(est, idx, layer, w, 2.0)  # scale * b~
        scale = w.abs().reshape(w.shape[0], -1).mean(dim=1).reshape((-1,) + (1,) * (w.dim() - 1))
        b = soft / scale
        assert (b != 0).all()
        expected = scale * torch.sign(b)
        torch.testing.assert_close(layer.deployed_weight(), expected)
        # the eval forward computes with exactly these weights ...
        torch.testing.assert_close(layer.quant_weight(), expected)
        # ... which follow the meta net, not sign(w)
    flips = sum(
        int((torch.sign(m.deployed_weight()) != torch.sign(m.weight.detach())).sum())
        for m in layers
    )
    assert flips > 0


def test_staircase_tends_to_hard_levels():
    for n in (2, 4, 8):
        z = torch.linspace(-1.3, 1.3, 101)
        r = (z + 1) * (n - 1) / 2  # level-index units: the midpoints sit at j - 0.5
        z = z[(torch.remainder(r, 1.0) - 0.5).abs() > 0.05]
        hard = -1 + 2 * hard_level(z, n) / (n - 1)
        torch.testing.assert_close(soft_staircase(z, n, 500.0), hard, atol=1e-4, rtol=0)


@pytest.mark.parametrize("bits", [1, 2])
def test_deployed_levels_within_bits_and_loss_regularizer(bits, cfg_train, tmp_path):
    from qexp.train.run import build_run, run_spec

    cfg = cfg_train("estimator=quantnet", f"bits={bits}", "model.width=8",
                    "estimator.embed_dim=2", "estimator.meta_lr=0.01")  # fmt: skip
    parts = build_run(run_spec(cfg), tmp_path)
    data, model, opt = parts.data, parts.model, parts.optimizer
    est = model.estimator
    meta_group = [g for g in opt.param_groups if g["name"].startswith("estimator")]
    assert len(meta_group) == 1 and meta_group[0]["lr"] == 0.01
    assert meta_group[0]["weight_decay"] == 0.0
    assert {id(p) for p in meta_group[0]["params"]} == {id(p) for p in est.parameters()}
    model.train()
    for step, (x, y) in enumerate(data.train_batches(64, 0, 0, torch.device("cpu"))):
        if step == 3:
            break
        est.step(step / 5)
        with calibration(model) if step == 0 else contextlib.nullcontext():
            loss, logits, logs = est.loss(model, x, y, F.cross_entropy)
        # loss = task + lambda * mean(1 - b~^2) (k bits: the staircase's normalized slope)
        assert loss.item() == pytest.approx(
            F.cross_entropy(logits, y).item() + est.reg_weight * float(logs["meta_reg"]), rel=1e-5
        )
        assert 0.0 < float(logs["meta_reg"]) <= 1.0 + 1e-6 or bits > 1
        opt.zero_grad()
        loss.backward()
        opt.step()
    x, _ = next(iter(data.eval_batches("test", 128, torch.device("cpu"))))
    table = layer_table(model.net, x)
    assert all(row["ok"] for row in table)
    body = [row for row in table if row["role"] == "body"]
    assert body and all(1 < row["levels"]["weight"] <= 2**bits for row in body)
    for _, layer in quant_layers(model.net):
        if layer.layer_role == "body":
            dep = layer.deployed_weight()
            rows = dep.reshape(dep.shape[0], -1)
            assert max(len(torch.unique(r)) for r in rows) <= 2**bits


@pytest.mark.slow
def test_cli_quantnet_one_bit_end_to_end(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "run"
    run_qexp("train", "estimator=quantnet", "bits=1", "trainer.epochs=2", *FAST,
             f"hydra.run.dir={run_dir}", cwd=tmp_path)  # fmt: skip
    m = read_metrics(run_dir)
    assert m["status"] == "completed", json.dumps(m)[:500]
    assert m["test_acc"] >= 0.2  # 10 classes: twice chance after 2 short epochs
    # gamma annealed to 100: the soft meta quantizer and its hard decisions nearly agree
    assert abs(m["test_acc_soft"] - m["test_acc"]) <= 0.1
    assert m["gamma"] == pytest.approx(100.0)
    body = [r for r in m["layers"] if r["role"] == "body"]
    assert all(r["levels"]["weight"] <= 2 for r in body)
    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/gamma", "train/meta_reg", "test/soft_hard_gap"} <= tags


@pytest.mark.parametrize("bits", [2, 3])
def test_dorefa_weights_deploy_dorefas_own_levels(bits):
    from qexp.quant.dorefa import DoReFaQuantizer

    torch.manual_seed(bits)
    layers = [
        QConv2d.from_float(nn.Conv2d(8, 16, 3), DoReFaQuantizer(bits, "weight"), None, "body"),
        QLinear.from_float(nn.Linear(64, 32), DoReFaQuantizer(bits, "weight"), None, "body"),
    ]
    est = QuantNet(gamma=1.0, hidden=8)
    holder = nn.ModuleList(layers)
    for m in layers:
        keep_reference(m, "estimator", est)
    est.attach(holder, EstimatorContext(total_steps=10, device=torch.device("cpu")))
    for layer in layers:
        w = layer.weight.detach()
        # at the residual start the meta net's decision is DoReFa's own quantizer
        deployed = layer.deployed_weight()
        torch.testing.assert_close(deployed, layer.w_quant.hard(w), rtol=0, atol=1e-6)
        assert torch.unique(deployed).numel() == 2**bits  # every level is used
