"""Memory budgets for learned mixed precision: sizes, penalty, config, end-to-end runs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import FAST, compose_config, read_metrics
from torch import nn

from qexp.errors import QexpError
from qexp.quant.budget import BudgetPenalty, budget_from_spec, measure_layers
from qexp.quant.calibrate import calibration
from qexp.quant.dq import DQU3Quantizer
from qexp.quant.layers import quant_layers
from qexp.quant.uniform import UniformQuantizer
from qexp.quant.wrap import LayerBits, quantize_model
from qexp.spec import BudgetSpec
from qexp.train.inspect_levels import layer_table, weight_kb

KB = 8 * 1024


def _net(bits: int = 4) -> nn.Module:
    """conv(1->4) - relu - conv(4->8) - relu - pool - linear(8->3), body quantized by U3."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 3),
    )
    quantize_model(
        net,
        body=lambda role, b: DQU3Quantizer(b, role),
        edge=lambda role, b: UniformQuantizer(b, role),
        body_bits=LayerBits(bits, bits),
        first_bits=8,
        last_bits=8,
    )
    net.train()
    with calibration(net):
        net(torch.randn(4, 1, 6, 6))  # the calibration phase initialises the quantizers
    return net


def test_measured_sizes_and_weight_kb_match_the_layer_table():
    net = _net()
    layers = measure_layers(net, torch.zeros(1, 1, 6, 6))
    assert [ls.params for ls in layers] == [36, 288, 576, 24]
    assert [ls.act_elems for ls in layers] == [36, 4 * 36, 8 * 36, 8]
    budget = BudgetPenalty()
    budget.bind(layers)
    want = (36 * 8 + 288 * 4 + 576 * 4 + 24 * 8) / KB
    assert budget.weight_kb().item() == pytest.approx(want)
    table = layer_table(net, torch.randn(2, 1, 6, 6))
    assert weight_kb(table) == pytest.approx(want)
    # activations: the largest layer input (max) or all of them (sum)
    assert budget.act_kb().item() == pytest.approx(8 * 36 * 4 / KB)
    summed = BudgetPenalty(act_budget_mode="sum")
    summed.bind(layers)
    assert summed.act_kb().item() == pytest.approx((36 * 8 + 144 * 4 + 288 * 4 + 8 * 8) / KB)


def test_penalty_is_zero_under_budget():
    net = _net()
    budget = BudgetPenalty(weight_budget_kb=10.0, act_budget_kb=10.0)
    budget.bind(measure_layers(net, torch.zeros(1, 1, 6, 6)))
    penalty = budget()
    assert penalty.item() == 0.0
    assert not budget.violations()


@pytest.mark.parametrize("which", ["weight", "activation"])
def test_penalty_over_budget_pushes_towards_fewer_bits(which):
    net = _net()
    if which == "weight":
        budget = BudgetPenalty(weight_budget_kb=0.2, lambda_w=0.1, budget_margin=0.0)
    else:
        budget = BudgetPenalty(
            act_budget_kb=0.05, act_budget_mode="sum", lambda_a=0.1, budget_margin=0.0
        )
    budget.bind(measure_layers(net, torch.zeros(1, 1, 6, 6)))
    s_w, s_a = budget.weight_kb().item(), budget.act_kb().item()
    over = s_w - 0.2 if which == "weight" else s_a - 0.05
    assert over > 0 and budget.violations()
    penalty = budget()
    assert penalty.item() == pytest.approx(0.1 * over**2, rel=1e-5)
    penalty.backward()
    body = [m for _, m in quant_layers(net) if m.layer_role == "body"]
    quants = [m.w_quant if which == "weight" else m.a_quant for m in body]
    # the bits are those of round(q_max / d): the descent direction shrinks the ratio itself
    before = [(q.q_max / q.d).item() for q in quants]
    for q in quants:
        # descent raises d and lowers q_max: a smaller q_max / d, so fewer bits
        assert q.d.grad.item() < 0 and q.q_max.grad.item() > 0
    with torch.no_grad():
        for q in quants:
            q.d -= 1e-3 * q.d.grad
            q.q_max -= 1e-3 * q.q_max.grad
    after = [(q.q_max / q.d).item() for q in quants]
    assert all(a < b for a, b in zip(after, before, strict=True))
    # edge layers have fixed bits: no quantizer gradient at all
    edge = [m for _, m in quant_layers(net) if m.layer_role != "body"]
    assert all(p.grad is None for m in edge for p in m.w_quant.parameters())


def test_margin_aims_below_the_budget_but_checks_the_budget_itself():
    net = _net()
    layers = measure_layers(net, torch.zeros(1, 1, 6, 6))
    size = BudgetPenalty(weight_budget_kb=1.0)
    size.bind(layers)
    s_w = size.weight_kb().item()
    # a budget just above the current size: met, yet the penalty still pulls below it
    budget = BudgetPenalty(weight_budget_kb=s_w * 1.01, lambda_w=0.1, budget_margin=0.05)
    budget.bind(layers)
    assert not budget.violations()
    expected = 0.1 * (s_w - s_w * 1.01 * 0.95) ** 2
    assert budget().item() == pytest.approx(expected, rel=1e-5)
    exact = BudgetPenalty(weight_budget_kb=s_w * 1.01, lambda_w=0.1, budget_margin=0.0)
    exact.bind(layers)
    assert exact().item() == 0.0


def test_average_bits_convert_to_kb_for_the_model():
    net = _net()
    layers = measure_layers(net, torch.zeros(1, 1, 6, 6))
    budget = BudgetPenalty(weight_avg_bits=3, act_avg_bits=2)
    budget.bind(layers)
    assert budget.weight_budget_kb == pytest.approx(3 * (36 + 288 + 576 + 24) / KB)
    assert budget.act_budget_kb == pytest.approx(2 * 288 / KB)


@pytest.mark.parametrize(
    ("node", "match"),
    [
        ({"weight_kb": 10, "weight_avg_bits": 3}, "budget.weight_kb or budget.weight_avg_bits"),
        ({"act_mode": "mean"}, "max | sum"),
        ({"weight_kb": -1}, "budget.weight_kb=-1: use null or a positive number"),
        ({"lambda_w": "big"}, "lambda_w"),
    ],
)
def test_bad_budget_options_are_one_line_errors(node, match):
    with pytest.raises(QexpError, match=match):
        budget_from_spec(BudgetSpec(**node))
    assert not budget_from_spec(BudgetSpec()).active


def test_validate_rejects_bad_budget_and_accepts_the_yaml():
    from qexp.config.registry import group_options
    from qexp.config.validate import validate_config

    for name in group_options("quantizer"):
        validate_config(compose_config(f"quantizer={name}"))
    bad = compose_config("quantizer=dq_u3", "budget.act_mode=mean")
    with pytest.raises(QexpError, match="budget.act_mode"):
        validate_config(bad)


def test_dq_u3_initialises_from_init_from_weights(tmp_path: Path):
    """Quantizer ranges come from the loaded weights, not from the random initial ones."""
    from qexp.data.base import DataInfo
    from qexp.train.checkpoint import save_checkpoint
    from qexp.train.run import build_model, run_spec

    info = DataInfo(name="digits", num_classes=10, in_channels=1, image_size=8)
    src_cfg = compose_config("bits=32", "dataset=digits")
    src = build_model(run_spec(src_cfg), info, torch.device("cpu"), total_steps=1)
    with torch.no_grad():
        for p in src.parameters():
            p.mul_(3.0)  # distinct from any fresh initialisation
    save_checkpoint({"model": src.state_dict()}, tmp_path / "fp.pt")
    cfg = compose_config("quantizer=dq_u3", "dataset=digits", f"init_from={tmp_path / 'fp.pt'}")
    model = build_model(run_spec(cfg), info, torch.device("cpu"), total_steps=1)
    body = [(n, m) for n, m in model.layers() if m.layer_role == "body"]
    assert body and not any(bool(m.w_quant.initialized) for _, m in body)
    model.train()
    with calibration(model):
        model(torch.randn(4, 1, 8, 8))
    src_weights = dict(src.net.named_parameters())
    for name, m in body:
        loaded = src_weights[f"{name}.weight"]
        torch.testing.assert_close(m.weight.detach(), loaded.detach())
        assert m.w_quant.q_max.item() == pytest.approx(loaded.abs().max().item(), rel=1e-6)
        assert m.w_bits == 4


def _tb(run_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    ea.Reload()
    return ea


def _train(run_dir: Path, *overrides: str) -> dict:
    """One `qexp train` run in this process (no interpreter start-up: keeps the tests fast)."""
    from qexp.train.run import run_training

    cfg = compose_config(*FAST, *overrides)
    run_training(cfg, run_dir)
    return read_metrics(run_dir)


@pytest.mark.slow
def test_budget_run_meets_the_budget_and_logs_bits(tmp_path: Path):
    budget = 26.0  # uniform 4 bits with 8-bit edges: 32.4 KB; all body layers at 3 bits: 24.5
    run_dir = tmp_path / "r"
    m = _train(
        run_dir,
        "quantizer=dq_u3",
        f"budget.weight_kb={budget}",
        "trainer.epochs=2",
        "trainer.batch_size=32",
        "trainer.quantizer_lr=0.01",
        "trainer.log_every=10",
    )
    assert m["status"] == "completed" and m["budget_met"] is True
    assert m["weight_kb"] <= budget and m["weight_budget_kb"] == budget
    assert m["best_epoch"] is not None
    best = m["history"][m["best_epoch"] - 1]
    assert best["budget_met"] and best["weight_kb"] <= budget
    rows = m["layers"]
    assert all(r["ok"] for r in rows)
    assert sum(r["kb"] for r in rows) == pytest.approx(m["weight_kb"], abs=1e-3)
    assert any(r["w_bits"] < 4 for r in rows if r["role"] == "body")
    assert all("act_kb" in r for r in rows) and m["act_kb"] > 0
    ea = _tb(run_dir)
    scalars = set(ea.Tags()["scalars"])
    for name in (r["name"] for r in rows):
        assert {f"width/{name}/w", f"width/{name}/a"} <= scalars
    assert {"train/budget_penalty", "width/weight_kb", "width/act_kb"} <= scalars
    assert ea.Tags()["images"] == ["width/per_layer"]
    assert any(t.startswith("layers") for t in ea.Tags()["tensors"])


@pytest.mark.slow
def test_unreachable_budget_reports_the_last_epoch_plainly(tmp_path: Path):
    run_dir = tmp_path / "r"
    # below even 2-bit body weights (16.7 KB)
    m = _train(run_dir, "quantizer=dq_u3", "budget.weight_kb=5", "trainer.epochs=1")
    assert m["status"] == "completed"
    assert m["reason"].startswith("budget not met (weights ") and "> 5.00 KB" in m["reason"]
    assert m["budget_met"] is False and m["best_epoch"] is None
    assert m["weight_kb"] > 5 and "test_acc" in m


def _digits_conv_sizes() -> list[int]:
    """Weights of each Conv2d / Linear of the default model on digits, in order (float net)."""
    from hydra import compose, initialize_config_module

    from qexp.config.schema import register_schemas
    from qexp.data.digits import Digits
    from qexp.train.build import build_net

    register_schemas()
    with initialize_config_module(config_module="qexp.conf", version_base=None):
        cfg = compose(config_name="config", overrides=["dataset=digits"])
    net = build_net(cfg.model, Digits().info)
    return [m.weight.numel() for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def test_preflight_refuses_a_budget_below_the_smallest_reachable_size(
    capsys, tmp_path, monkeypatch
):
    from qexp.cli import main

    sizes = _digits_conv_sizes()
    # independent count: edges at 8 bits, body layers at dq_u3's b_min = 2
    smallest = (8 * (sizes[0] + sizes[-1]) + 2 * sum(sizes[1:-1])) / KB
    monkeypatch.chdir(tmp_path)
    for override in ("budget.weight_kb=10", "budget.weight_avg_bits=1.5"):
        extra = ["budget.weight_kb=null"] if "avg" in override else []
        code = main(["train", "dataset=digits", "quantizer=dq_u3", override, *extra])
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1, err
        assert f"{smallest:.2f} KB" in err and override.split("=")[0] in err, err
    assert not (tmp_path / "runs").exists()
    # a budget just above it is accepted by the preflight (the run itself is not started)
    from qexp.train.preflight import check_command_line

    above = f"budget.weight_kb={smallest + 0.01:.2f}"
    check_command_line(["dataset=digits", "quantizer=dq_u3", above])


@pytest.mark.slow
def test_default_dq_u3_meets_a_60_percent_budget_with_mixed_bits(tmp_path: Path):
    sizes = _digits_conv_sizes()
    four_bit = (8 * (sizes[0] + sizes[-1]) + 4 * sum(sizes[1:-1])) / KB
    budget = round(0.6 * four_bit, 2)  # 19.4 KB for the default small_cnn
    overrides = ("quantizer=dq_u3", f"budget.weight_kb={budget}", "trainer.epochs=10")
    m = _train(tmp_path / "r", *overrides)
    assert m["status"] == "completed", m["status"]
    assert m["weight_kb"] <= budget and m["budget_met"] is True
    body_bits = {r["w_bits"] for r in m["layers"] if r["role"] == "body"}
    assert len(body_bits) > 1, m["layers"]  # the budget is met by mixed, not uniform, bits
    assert all(r["ok"] for r in m["layers"])


@pytest.mark.slow
def test_bits_32_is_a_full_precision_network_unless_edges_are_set(tmp_path: Path):
    sizes = _digits_conv_sizes()
    m = _train(tmp_path / "fp", "bits=32", "trainer.epochs=1")
    assert m["first_bits"] == 32 and m["last_bits"] == 32
    assert all(r["w_bits"] == 32 and r["a_bits"] == 32 for r in m["layers"])
    assert m["weight_kb"] == pytest.approx(32 * sum(sizes) / KB, abs=1e-3)
    m8 = _train(tmp_path / "edges", "bits=32", "layers.first_bits=8", "trainer.epochs=1")
    rows = m8["layers"]
    assert rows[0]["w_bits"] == 8 and rows[-1]["w_bits"] == 32
    assert m8["weight_kb"] == pytest.approx((8 * sizes[0] + 32 * sum(sizes[1:])) / KB, abs=1e-3)
    m4 = _train(tmp_path / "q", "bits=4", "trainer.epochs=1")
    assert m4["first_bits"] == 8 and m4["last_bits"] == 8  # quantized runs keep 8-bit edges
