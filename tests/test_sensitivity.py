"""Sensitivity analysis core: Hutchinson traces, per-layer measurements, budget suggestion,
writers (tiny models, no trainer)."""

from __future__ import annotations

import copy
import csv
import io
import itertools
import math
import random

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn
from torch.func import functional_call

from qexp.analysis.hutchinson import hutchinson_traces
from qexp.analysis.report import overrides_yaml, to_csv, to_markdown, write_report
from qexp.analysis.sensitivity import (
    LayerSensitivity,
    SensitivityTable,
    accuracy,
    default_weight_quantizer,
    measure_sensitivity,
    spearman,
    suggest_bits,
    suggest_overrides,
    weight_kb,
    weight_quantizer,
)
from qexp.errors import QexpError
from qexp.quant.calibrate import calibrate
from qexp.quant.layers import quant_layers
from qexp.quant.overrides import parse_rules, resolve_plan
from qexp.quant.uniform import UniformQuantizer
from qexp.quant.wrap import LayerBits, quantize_model


# -- Hutchinson against the exact Hessian ------------------------------------------------------
def _tiny():
    torch.manual_seed(3)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3))
    x, y = torch.randn(16, 3), torch.randint(0, 3, (16,))
    return net, x, y


def _exact_hessian(net, x, y, names):
    """The loss Hessian over the concatenated parameters ``names`` (the others fixed)."""
    params = dict(net.named_parameters())
    shapes = [params[n].shape for n in names]
    sizes = [params[n].numel() for n in names]
    flat = torch.cat([params[n].detach().reshape(-1) for n in names])

    def loss(v):
        parts = torch.split(v, sizes)
        override = {n: p.reshape(s) for n, p, s in zip(names, parts, shapes, strict=True)}
        return F.cross_entropy(functional_call(net, {**params, **override}, (x,)), y)

    return torch.autograd.functional.hessian(loss, flat), sizes


def test_hutchinson_matches_the_exact_hessian_trace():
    net, x, y = _tiny()
    names = ["0.weight", "2.weight"]
    h, sizes = _exact_hessian(net, x, y, names)
    params = dict(net.named_parameters())
    probes = 1000
    est = hutchinson_traces(
        lambda: F.cross_entropy(net(x), y), [params[n] for n in names], probes=probes, seed=0
    )
    start = 0
    for e, size in zip(est, sizes, strict=True):
        block = h[start : start + size]
        own = block[:, start : start + size]
        exact = float(torch.trace(own))
        # variance of one probe: 2 (||H_ll||_F^2 - sum diag^2) + ||H_l,rest||_F^2
        var = 2 * float((own**2).sum() - (own.diagonal() ** 2).sum())
        var += float((block**2).sum() - (own**2).sum())
        sd = math.sqrt(var / probes)
        assert abs(e.trace - exact) < 4 * sd + 1e-9, (e.trace, exact, sd)
        assert 0.8 * sd < e.stderr < 1.25 * sd  # the reported standard error is the right size
        start += size
    # the probes come from their own seeded generator: same seed, same numbers
    again = hutchinson_traces(
        lambda: F.cross_entropy(net(x), y), [params[n] for n in names], probes=probes, seed=0
    )
    assert [a.trace for a in again] == [e.trace for e in est]


def test_hutchinson_is_exact_for_a_diagonal_hessian():
    """v^T H v = sum_i H_ii v_i^2 = tr(H) for every Rademacher v when H is diagonal."""
    w = torch.randn(7, requires_grad=True)
    c = torch.rand(7) + 0.5
    (est,) = hutchinson_traces(lambda: (c * w**4).sum(), [w], probes=3, seed=1)
    exact = float((12 * c * w.detach() ** 2).sum())
    assert est.trace == pytest.approx(exact, rel=1e-6) and est.stderr == pytest.approx(0, abs=1e-5)


def test_hutchinson_block_without_curvature_is_zero():
    a = torch.randn(3, requires_grad=True)
    b = torch.randn(3, requires_grad=True)
    est = hutchinson_traces(lambda: (a**2).sum() + (2 * b).sum(), [a, b], probes=4)
    assert est[0].trace == pytest.approx(6.0) and est[1].trace == 0.0


# -- measurements on a quantized network -------------------------------------------------------
class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.block = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1), nn.ReLU())
        self.fc = nn.Linear(6 * 16, 5)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv(x)), 2)
        return self.fc(torch.flatten(self.block(x), 1))


def _uniform(role, bits, options=None):
    return None if bits >= 32 else UniformQuantizer(bits, role)


def _quantized(bits=4, rules=()):
    torch.manual_seed(0)
    net = _Net()
    x = torch.randn(96, 1, 8, 8)
    with torch.no_grad():
        y = net(x).argmax(1)  # labels the float net gets right: accuracy has room to fall
    plan = resolve_plan(net, list(rules), LayerBits(bits, bits), 8, 8)
    quantize_model(net, _uniform, _uniform, LayerBits(bits, bits), 8, 8, plan=plan)
    calibrate(net, x)
    net.eval()
    batches = [(x[i : i + 32], y[i : i + 32]) for i in range(0, 96, 32)]
    return net, batches


def _state(net):
    return {k: v.clone() for k, v in net.state_dict().items()}


def test_swapping_a_weight_quantizer_restores_the_layer_exactly():
    net, batches = _quantized(rules=[{"match": "fc", "float": True}])
    before = _state(net)
    layers = dict(quant_layers(net))
    sentinel = object()
    layers["conv"].__dict__["estimator"] = sentinel
    for name in ("conv", "fc"):  # with a quantizer and without one
        layer = layers[name]
        old = layer.w_quant
        where = "w_quant" in layer._modules
        with weight_quantizer(layer, default_weight_quantizer(2)):
            assert layer.w_quant.bits == 2 and layer.__dict__["estimator"] is None
        assert layer.w_quant is old and ("w_quant" in layer._modules) == where
    assert layers["conv"].__dict__["estimator"] is sentinel
    after = net.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_measured_accuracy_is_the_network_with_only_that_layer_requantized():
    net, batches = _quantized()
    before = _state(net)
    table = measure_sensitivity(net, batches, batches[:1], bits=(2, 8), probes=8)
    after = net.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert table.base_acc == accuracy(net, batches)
    assert [r.name for r in table.layers] == ["conv", "block.0", "fc"]
    for row in table.layers:
        for b in (2, 8):
            # independent of the swap: a copy whose layer computes with Q_b(w) as float weight
            ref = copy.deepcopy(net)
            layer = ref.get_submodule(row.name)
            with torch.no_grad():
                wq = default_weight_quantizer(b).hard(layer.weight)
                assert row.qerr[b] == pytest.approx(float(((wq - layer.weight) ** 2).sum()))
                layer.weight.copy_(wq)
            layer.w_quant = None
            assert row.acc[b] == accuracy(ref, batches)
            assert row.proxy(b) == pytest.approx(max(row.trace, 0) / row.params * row.qerr[b])
        assert row.qerr[2] > row.qerr[8]
    assert table.ranked()[0].proxy(2) >= table.ranked()[-1].proxy(2)


def test_hessian_of_the_quantized_net_is_that_of_its_float_network():
    net, batches = _quantized()
    table = measure_sensitivity(net, batches, batches, bits=(4,), probes=200, seed=2)
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    # the same network unquantized: plain float layers sharing the weights
    float_net = _Net()
    float_net.load_state_dict(
        {k: v for k, v in net.state_dict().items() if "_quant" not in k}, strict=True
    )
    float_net.eval()
    for row in table.layers:
        name = f"{row.name}.weight"
        h, _ = _exact_hessian(float_net, x, y, [name])
        exact = float(torch.trace(h))
        assert abs(row.trace - exact) < 5 * row.trace_stderr + 1e-6 * abs(exact), row.name


def test_float_run_layers_can_be_measured():
    net, batches = _quantized(bits=32)
    table = measure_sensitivity(net, batches, batches[:1], bits=(2,), probes=4)
    assert all(r.w_bits == 32 for r in table.layers if r.role == "body")
    assert all(0 <= r.acc[2] <= 1 for r in table.layers)


def test_bad_arguments_are_one_line():
    net, batches = _quantized()
    with pytest.raises(QexpError, match="bit widths must lie in 1..16"):
        measure_sensitivity(net, batches, batches, bits=(0,))
    with pytest.raises(QexpError, match="no quantized layer 'head'; the layers are conv"):
        measure_sensitivity(net, batches, batches, names=["head"])


# -- the suggestion ------------------------------------------------------------------------------
def _synthetic(n=5, bits=(2, 3, 4, 8), seed=0) -> SensitivityTable:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        row = LayerSensitivity(
            f"l{i}", "Conv2d", "body", rng.randint(50, 5000), 4, 4, rng.uniform(0.1, 10), 0.0
        )
        for b in bits:
            row.acc[b] = 0.9
            # not convex in the bits on purpose: greedy steps can go wrong on such tables
            row.qerr[b] = rng.uniform(0.5, 2.0) * 4.0 ** (-b) * (20 if b == 2 else 1)
        rows.append(row)
    return SensitivityTable(0.9, tuple(bits), rows, 8, 64)


def _brute_force(table, budget_kb, choices):
    best = None
    for picks in itertools.product(choices, repeat=len(table.layers)):
        size = sum(r.weight_bytes(b) for r, b in zip(table.layers, picks, strict=True))
        if size > budget_kb * 1024:
            continue
        cost = sum(r.proxy(b) for r, b in zip(table.layers, picks, strict=True))
        if best is None or (cost, size) < best[:2]:
            best = (cost, size, picks)
    return best


@pytest.mark.parametrize("seed", range(6))
def test_suggestion_is_the_exact_optimum_within_the_budget(seed):
    table = _synthetic(seed=seed)
    choices = table.bits
    smallest = sum(r.weight_bytes(2) for r in table.layers) / 1024
    largest = sum(r.weight_bytes(8) for r in table.layers) / 1024
    for frac in (0.0, 0.1, 0.3, 0.6, 1.0):
        budget = smallest + frac * (largest - smallest)
        picks = suggest_bits(table, budget, choices)
        cost = sum(table.row(n).proxy(b) for n, b in picks.items())
        want = _brute_force(table, budget, choices)
        assert weight_kb(table, picks) <= budget + 1e-9
        assert cost == pytest.approx(want[0], rel=1e-12, abs=1e-15)


def test_suggestion_keeps_fixed_layers_and_refuses_an_impossible_budget():
    table = _synthetic()
    fixed = {"l0": 8}
    rest = sum(r.weight_bytes(2) for r in table.layers[1:]) / 1024
    budget = table.row("l0").weight_bytes(8) / 1024 + rest
    picks = suggest_bits(table, budget, fixed=fixed)
    assert picks["l0"] == 8 and all(picks[f"l{i}"] == 2 for i in range(1, 5))
    with pytest.raises(QexpError, match="cannot be met: the fewest bits"):
        suggest_bits(table, budget - 0.01, fixed=fixed)
    with pytest.raises(QexpError, match="5 bits was not measured"):
        suggest_bits(table, 100, choices=(2, 5))
    rules = suggest_overrides(table, budget, fixed=fixed)
    assert rules[0] == {"match": "l0", "w_bits": 8} and len(rules) == 5


def test_spearman_against_a_hand_computed_case():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ranks a = (0, 1, 2, 3), b = (0.5, 0.5, 3, 2): 1 - 6 sum d^2 / (n (n^2 - 1)) without ties
    a, b = [1, 2, 3, 4], [5, 5, 9, 7]
    ra, rb = [0, 1, 2, 3], [0.5, 0.5, 3, 2]
    ma, mb = sum(ra) / 4, sum(rb) / 4
    cov = sum((p - ma) * (q - mb) for p, q in zip(ra, rb, strict=True))
    va = sum((p - ma) ** 2 for p in ra)
    vb = sum((q - mb) ** 2 for q in rb)
    assert spearman(a, b) == pytest.approx(cov / math.sqrt(va * vb))


# -- writers -------------------------------------------------------------------------------------
def test_writers_agree_with_the_table(tmp_path):
    net, batches = _quantized()
    table = measure_sensitivity(net, batches, batches[:1], bits=(2, 4), probes=8)
    budget = sum(r.weight_bytes(3 if r.role == "body" else 4) for r in table.layers) / 1024
    rules = suggest_overrides(table, budget, choices=(2, 4))
    paths = write_report(table, tmp_path, rules, name="overrides_test", comment=["a comment"])
    md = paths["markdown"].read_text().splitlines()
    body = [ln for ln in md if ln.startswith("| ") and not ln.startswith("| rank")]
    assert [ln.split(" | ")[1] for ln in body] == [r.name for r in table.ranked()]
    parsed = list(csv.DictReader(io.StringIO(paths["csv"].read_text())))
    for line, r in zip(parsed, table.ranked(), strict=True):
        assert line["layer"] == r.name and int(line["params"]) == r.params
        assert float(line["acc@2"]) == pytest.approx(r.acc[2], abs=1e-6)
        assert float(line["proxy@4"]) == pytest.approx(r.proxy(4), rel=1e-5)
    assert paths["figure"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = paths["overrides"].read_text()
    assert paths["overrides"].parent.name == "experiment"
    assert text.splitlines()[0] == "# @package _global_" and "# a comment" in text
    loaded = yaml.safe_load(text)["layers"]["overrides"]
    assert loaded == rules
    plan = resolve_plan(net, parse_rules(loaded), LayerBits(4, 4), 8, 8)
    assert weight_kb(table, {r.name: r.w_bits for r in plan}) <= budget


def test_markdown_and_csv_list_every_bit_width():
    table = _synthetic(n=3, bits=(2, 8))
    md = to_markdown(table)
    assert "acc@2 (drop)" in md and "proxy@8" in md
    header = to_csv(table).splitlines()[0].split(",")
    assert header[-8:] == [
        "acc@2",
        "drop@2",
        "qerr@2",
        "proxy@2",
        "acc@8",
        "drop@8",
        "qerr@8",
        "proxy@8",
    ]


def test_overrides_yaml_quotes_patterns():
    text = overrides_yaml([{"match": "re:stage\\d", "w_bits": 2}, {"match": "it's", "float": True}])
    assert yaml.safe_load(text)["layers"]["overrides"] == [
        {"match": "re:stage\\d", "w_bits": 2},
        {"match": "it's", "float": True},
    ]
    assert yaml.safe_load(overrides_yaml([]))["layers"]["overrides"] == []
