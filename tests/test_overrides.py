"""Per-layer overrides: the rule language, the resolved plan and the network built from it."""

from __future__ import annotations

import math

import hydra.utils
import pytest
import torch
from torch import nn

from qexp.errors import QexpError
from qexp.export.graph import build_graph
from qexp.export.pack import unpack_codes
from qexp.models.small_cnn import SmallCNN
from qexp.quant.budget import (
    BudgetPenalty,
    check_reachable,
    measure_layers,
    weight_size_kb,
)
from qexp.quant.calibrate import calibrate
from qexp.quant.cost import cost_report
from qexp.quant.dq import DQU3Quantizer
from qexp.quant.layers import QConv2d, QLinear, QuantLayer, quant_layers
from qexp.quant.overrides import (
    format_plan,
    layer_quantizer_spec,
    parse_rules,
    resolve_plan,
)
from qexp.quant.uniform import UniformQuantizer
from qexp.quant.wrap import LayerBits, quantize_model
from qexp.train.inspect_levels import layer_table

BITS = LayerBits(4, 4)
NAMES = ["stem.0", "stage1.0", "stage2.0", "stage2.4", "fc"]


def _cnn() -> SmallCNN:
    torch.manual_seed(0)
    return SmallCNN(num_classes=10, in_channels=1, image_size=8, width=4)


def _uniform(role: str, bits: int, options: dict | None = None):
    if bits >= 32:
        return None
    return UniformQuantizer(bits, role, **(options or {}))


def _plan(rules, first=8, last=8, net=None):
    return resolve_plan(net or _cnn(), rules, BITS, first, last)


def _bits(plan) -> dict[str, tuple[int, int]]:
    return {r.name: (r.w_bits, r.a_bits) for r in plan}


# -- parsing -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("rules", "message"),
    [
        ({"match": "fc"}, "must be a list of rules"),
        (["fc"], "each rule is a mapping"),
        ([{"w_bits": 2}], "needs match"),
        ([{"match": "fc", "wbits": 2}], "unknown key 'wbits' (did you mean w_bits?)"),
        ([{"match": "fc"}], "sets nothing"),
        ([{"match": "fc", "w_bits": 5.5}], "w_bits=5.5 is not allowed"),
        ([{"match": "fc", "bits": 17}], "bits=17 is not allowed"),
        ([{"match": "fc", "a_bits": True}], "a_bits=True is not allowed"),
        ([{"match": "fc", "float": "yes"}], "float='yes' is not allowed"),
        ([{"match": "fc", "float": True, "w_bits": 2}], "drop its bits"),
        ([{"match": "re:stage(", "w_bits": 2}], "not a valid regular expression"),
        ([{"match": "type:", "w_bits": 2}], "needs a class name"),
        ([{"match": "fc", "quantizer": 3}], "use a mapping of quantizer options"),
        ([{"match": "fc", "quantizer": {"weight": {}, "bits": 2}}], "not both"),
    ],
)
def test_bad_rules_end_in_one_line(rules, message):
    with pytest.raises(QexpError) as info:
        parse_rules(rules)
    text = str(info.value)
    assert message in text and "\n" not in text
    assert text.startswith("layers.overrides")


def test_rules_accept_what_hydra_parses_from_the_command_line():
    from hydra.core.override_parser.overrides_parser import OverridesParser

    line = (
        "layers.overrides=[{match: stage2.*, w_bits: 2}, {match: 're:stage\\d\\.0', a_bits: 3},"
        " {match: type:Linear, float: true}, {match: '*.0', quantizer: {per_channel: false}}]"
    )
    value = OverridesParser.create().parse_overrides([line])[0].value()
    rules = parse_rules(value)
    assert [r.match for r in rules] == ["stage2.*", r"re:stage\d\.0", "type:Linear", "*.0"]
    assert (rules[0].w_bits, rules[0].a_bits, rules[1].a_bits) == (2, None, 3)
    assert rules[2].keep_float
    assert rules[3].quantizer == {
        "weight": {"per_channel": False},
        "activation": {"per_channel": False},
    }


def test_omegaconf_lists_are_accepted():
    from omegaconf import OmegaConf

    node = OmegaConf.create({"overrides": [{"match": "fc", "bits": 2}]})
    assert _bits(_plan(node.overrides))["fc"] == (2, 2)


# -- resolution --------------------------------------------------------------------------------
def test_no_rules_is_the_first_last_policy():
    plan = _plan([])
    assert [r.name for r in plan] == NAMES
    assert [r.role for r in plan] == ["first", "body", "body", "body", "last"]
    assert _bits(plan) == {"stem.0": (8, 8), "fc": (8, 8)} | {n: (4, 4) for n in NAMES[1:4]}
    assert all(r.set_by == "-" and not r.w_fixed for r in plan)
    # null edge bits: the edge layer is an ordinary body layer
    plan = _plan([], first=None, last=2)
    assert plan.row("stem.0").role == "body" and _bits(plan)["stem.0"] == (4, 4)
    assert plan.row("fc").role == "last" and _bits(plan)["fc"] == (2, 2)


@pytest.mark.parametrize(
    ("match", "selected"),
    [
        ("stage2", ["stage2.0", "stage2.4"]),  # a block selects the layers inside it
        ("stage2.*", ["stage2.0", "stage2.4"]),
        ("*.0", ["stem.0", "stage1.0", "stage2.0"]),
        ("stage?.0", ["stage1.0", "stage2.0"]),
        ("fc", ["fc"]),
        (r"re:stage\d\.\d", ["stage1.0", "stage2.0", "stage2.4"]),
        ("re:stage", []),  # a regular expression must match a whole name
        ("re:stage.", ["stage1.0", "stage2.0", "stage2.4"]),  # ... or a containing module's
        ("type:Conv2d", NAMES[:4]),
        ("type:Linear", ["fc"]),
        ("type:Module", []),  # nn.Module itself is not a type a rule selects by
    ],
)
def test_match_selects_layers_by_name_regex_or_type(match, selected):
    if not selected:
        with pytest.raises(QexpError, match="selects no layer"):
            _plan([{"match": match, "w_bits": 3}])
        return
    plan = _plan([{"match": match, "w_bits": 3}])
    got = [r.name for r in plan if r.rules == (0,)]
    assert got == selected
    for r in plan:
        assert r.w_bits == (3 if r.name in selected else 8 if r.role != "body" else 4)
        assert r.w_fixed == (r.name in selected) and not r.a_fixed


def test_rules_apply_in_order_after_the_edge_policy():
    plan = _plan(
        [
            {"match": "*", "bits": 3},
            {"match": "stage2", "w_bits": 2},
            {"match": "stage2.4", "float": True},
            {"match": "fc", "a_bits": 32},
        ]
    )
    assert _bits(plan) == {
        "stem.0": (3, 3),  # a rule overrides the first-layer policy
        "stage1.0": (3, 3),
        "stage2.0": (2, 3),
        "stage2.4": (32, 32),
        "fc": (3, 32),
    }
    assert plan.row("stem.0").role == "first"  # ... but not the role
    assert plan.row("stage2.4").keep_float and not plan.row("fc").keep_float
    assert plan.row("stage2.4").rules == (0, 1, 2)
    assert plan.row("stage2.4").set_by == "overrides[0], overrides[1], overrides[2]"


def test_quantizer_options_merge_per_role_and_target_replaces():
    plan = _plan(
        [
            {"match": "stage2", "quantizer": {"per_channel": False}},
            {"match": "stage2.4", "quantizer": {"weight": {"scale_method": "max_abs"}}},
            {"match": "fc", "quantizer": {"activation": {"signed_grid": "narrow"}}},
            {"match": "fc", "quantizer": {"activation": {"_target_": "x.Y", "k": 1}}},
        ]
    )
    assert plan.row("stage2.0").quantizer == {
        "weight": {"per_channel": False},
        "activation": {"per_channel": False},
    }
    assert plan.row("stage2.4").quantizer["weight"] == {
        "per_channel": False,
        "scale_method": "max_abs",
    }
    assert plan.row("fc").quantizer == {"activation": {"_target_": "x.Y", "k": 1}}
    assert plan.row("stem.0").quantizer == {}
    # merged over the role's node of a quantizer group, as build.quantizer_factory reads it
    node = {"name": "uniform", "weight": {"_target_": "W", "per_channel": True}, "activation": {}}
    spec = layer_quantizer_spec(node, "weight", plan.row("stage2.4").quantizer["weight"])
    assert spec == {"_target_": "W", "per_channel": False, "scale_method": "max_abs"}
    assert layer_quantizer_spec({"_target_": "E"}, "activation", None) == {"_target_": "E"}
    assert layer_quantizer_spec(node, "activation", {"_target_": "X"}) == {"_target_": "X"}


def test_a_rule_that_selects_nothing_names_the_layers():
    with pytest.raises(QexpError) as info:
        _plan([{"match": "fc", "bits": 2}, {"match": "stage3*", "bits": 2}])
    text = str(info.value)
    assert "overrides[1]: match 'stage3*' selects no layer" in text
    assert "stem.0, stage1.0, stage2.0, stage2.4, fc" in text
    # many layers: shortened, first and last still named
    deep = nn.Sequential(*[nn.Linear(4, 4) for _ in range(40)])
    with pytest.raises(QexpError) as info:
        _plan([{"match": "head", "bits": 2}], net=deep)
    text = str(info.value)
    assert "0, 1, 2" in text and "39" in text and "more" in text and "25" not in text
    with pytest.raises(QexpError, match="the layer types are Conv2d, Linear"):
        _plan([{"match": "type:Conv1d", "float": True}])


# -- layers qexp cannot wrap -------------------------------------------------------------------
class _WithConv1d(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Conv1d(1, 4, 3, padding=1)
        self.head = nn.Linear(32, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.embed(x), 1))


def test_unwrappable_layer_is_one_line_unless_kept_in_float():
    with pytest.raises(QexpError) as info:
        _plan([], net=_WithConv1d())
    text = str(info.value)
    assert "layer embed is a Conv1d, which qexp cannot quantize" in text
    assert "nn.Conv2d and nn.Linear" in text and "{match: embed, float: true}" in text
    with pytest.raises(QexpError, match=r"overrides\[0\] quantizes it"):
        _plan([{"match": "*", "bits": 2}], net=_WithConv1d())
    net = _WithConv1d()
    x = torch.randn(2, 1, 8)
    want = net(x)
    rules = [{"match": "*", "bits": 2}, {"match": "type:Conv1d", "float": True}]
    plan = resolve_plan(net, rules, BITS, None, None)
    assert [(r.name, r.kind, r.wrappable, r.keep_float) for r in plan] == [
        ("embed", "Conv1d", False, True),
        ("head", "Linear", True, False),
    ]
    quantize_model(net, _uniform, _uniform, BITS, None, None, plan=plan)
    assert type(net.embed) is nn.Conv1d and isinstance(net.head, QLinear)
    calibrate(net, x)
    net.eval()
    with torch.no_grad():
        assert net(x).shape == want.shape


@pytest.mark.parametrize(
    "layer", [nn.ConvTranspose2d(1, 2, 3), nn.Conv3d(1, 2, 3), nn.Bilinear(2, 2, 2)]
)
def test_other_conv_and_linear_kinds_are_refused(layer):
    net = nn.Sequential(layer, nn.Flatten(), nn.LazyLinear(2))
    with pytest.raises(QexpError, match=f"layer 0 is a {type(layer).__name__}"):
        _plan([], net=net)


def test_subclass_with_its_own_forward_is_not_wrapped_silently():
    class ScaledConv(nn.Conv2d):
        def forward(self, x):  # computes something else than nn.Conv2d: cannot be swapped
            return 2 * super().forward(x)

    net = nn.Sequential(ScaledConv(1, 2, 3), nn.Flatten(), nn.Linear(8, 2))
    with pytest.raises(QexpError, match=r"layer 0 is a test_overrides\.\S*ScaledConv, which"):
        _plan([], net=net)
    plan = _plan([{"match": "type:Conv2d", "float": True}], net=net)  # base classes count
    assert plan.row("0").keep_float and not plan.row("0").wrappable


def test_model_without_conv_or_linear():
    net = nn.Sequential(nn.Flatten(), nn.ReLU())
    with pytest.raises(QexpError) as info:
        _plan([], net=net)
    assert "model Sequential has no nn.Conv2d or nn.Linear layer" in str(info.value)


# -- the built network -------------------------------------------------------------------------
def test_quantize_model_builds_each_layer_from_its_row():
    calls = []

    def body(role, bits, options=None):
        calls.append(("body", role, bits, options))
        return _uniform(role, bits, options)

    def edge(role, bits, options=None):
        calls.append(("edge", role, bits, options))
        return _uniform(role, bits, options)

    net = _cnn()
    rules = [
        {"match": "stage2", "w_bits": 2},
        {"match": "stage2.4", "float": True},
        {"match": "fc", "quantizer": {"weight": {"per_channel": False}}},
    ]
    plan = resolve_plan(net, rules, BITS, 8, 8)
    names = quantize_model(net, body, edge, BITS, 8, 8, plan=plan)
    assert names == NAMES
    layers = dict(quant_layers(net))
    assert list(layers) == NAMES  # a layer kept in float is still a (quantizer-less) QuantLayer
    got = {n: (m.w_bits, m.a_bits, m.layer_role) for n, m in layers.items()}
    assert got == {
        "stem.0": (8, 8, "first"),
        "stage1.0": (4, 4, "body"),
        "stage2.0": (2, 4, "body"),
        "stage2.4": (32, 32, "body"),
        "fc": (8, 8, "last"),
    }
    assert layers["stage2.4"].w_quant is None and layers["stage2.4"].a_quant is None
    assert layers["fc"].w_quant.per_channel is False and layers["stem.0"].w_quant.per_channel
    # options only where a rule set them: every other call is the plain (role, bits) call
    assert ("edge", "weight", 8, {"per_channel": False}) in calls
    assert [c for c in calls if c[3] is not None] == [("edge", "weight", 8, {"per_channel": False})]
    assert not any(c[0] == "edge" and c[2] == 2 for c in calls)


def test_no_plan_builds_what_an_empty_plan_builds():
    """quantize_model without a plan: the same quantizers, outputs and state as before."""
    nets = []
    for plan in (None, "empty"):
        net = _cnn()
        p = resolve_plan(net, [], BITS, 8, 8) if plan else None
        torch.manual_seed(1)
        quantize_model(net, _uniform, _uniform, BITS, 8, 8, plan=p)
        nets.append(net)
    x = torch.randn(4, 1, 8, 8)
    for net in nets:
        calibrate(net, x)
        net.eval()
    assert nets[0].state_dict().keys() == nets[1].state_dict().keys()
    for k, v in nets[0].state_dict().items():
        assert torch.equal(v, nets[1].state_dict()[k]), k
    with torch.no_grad():
        assert torch.equal(nets[0](x), nets[1](x))


def test_float_layer_computes_like_the_float_conv():
    net = _cnn()
    conv = net.stage2[0]
    plan = resolve_plan(net, [{"match": "stage2.0", "float": True}], BITS, 8, 8)
    quantize_model(net, _uniform, _uniform, BITS, 8, 8, plan=plan)
    layer = net.stage2[0]
    assert isinstance(layer, QConv2d) and layer.weight is conv.weight
    x = torch.randn(2, 4, 4, 4)
    net.train()
    with torch.no_grad():
        torch.testing.assert_close(layer(x), nn.Conv2d.forward(conv, x))


def test_stage2_at_2_bits_agrees_in_layer_table_cost_and_export():
    """Rule ``stage2: 2 bits``: the layer table, the cost report and the exported codes all
    see each layer at its own bits (2 for stage2, 4 for the body, 8 at the edges)."""
    net = _cnn()
    plan = resolve_plan(net, [{"match": "stage2", "w_bits": 2}], BITS, 8, 8)
    quantize_model(net, _uniform, _uniform, BITS, 8, 8, plan=plan)
    x = torch.randn(16, 1, 8, 8)
    calibrate(net, x)
    net.eval()
    want = {r.name: r.w_bits for r in plan}
    assert want == {"stem.0": 8, "stage1.0": 4, "stage2.0": 2, "stage2.4": 2, "fc": 8}
    table = {r["name"]: r for r in layer_table(net, x)}
    cost = {r["name"]: r for r in cost_report(net, x)["layers"]}
    graph, tensors = build_graph(net, x)
    nodes = {n["module"]: n for n in graph["nodes"] if n["op"] in ("qconv", "qlinear")}
    for name, bits in want.items():
        params = plan.row(name).params
        packed = math.ceil(params * bits / 8)
        assert table[name]["w_bits"] == cost[name]["w_bits"] == nodes[name]["weight"]["bits"]
        assert table[name]["w_bits"] == bits
        assert table[name]["levels"]["weight"] <= 2**bits and table[name]["ok"]
        assert cost[name]["weight_bytes"] == packed
        assert tensors[nodes[name]["weight"]["codes"]].size == packed
        assert table[name]["kb"] == pytest.approx(params * bits / 8 / 1024)
        codes = unpack_codes(tensors[nodes[name]["weight"]["codes"]], bits, params)
        assert codes.max() < 2**bits


def test_float_layer_is_exported_and_costed_at_32_bits():
    net = _cnn()
    plan = resolve_plan(net, [{"match": "stage1", "float": True}], BITS, 8, 8)
    quantize_model(net, _uniform, _uniform, BITS, 8, 8, plan=plan)
    x = torch.randn(8, 1, 8, 8)
    calibrate(net, x)
    net.eval()
    params = plan.row("stage1.0").params
    cost = {r["name"]: r for r in cost_report(net, x)["layers"]}
    assert cost["stage1.0"]["weight_bytes"] == 4 * params
    table = {r["name"]: r for r in layer_table(net, x)}
    assert table["stage1.0"]["w_bits"] == 32 and table["stage1.0"]["ok"]
    graph, tensors = build_graph(net, x)
    node = next(n for n in graph["nodes"] if n.get("module") == "stage1.0")
    assert node["act"] is None and tensors[node["weight"]["float"]].nbytes == 4 * params


# -- learned precision and budgets -------------------------------------------------------------
def _dq(role, bits, options=None):
    return None if bits >= 32 else DQU3Quantizer(bits, role, b_min=2)


def test_fixed_layer_keeps_its_bits_and_counts_as_a_constant_in_the_budget():
    net = _cnn()
    plan = resolve_plan(net, [{"match": "stage2.0", "w_bits": 3}], BITS, 8, 8)
    quantize_model(net, _dq, _uniform, BITS, 8, 8, plan=plan)
    x = torch.randn(8, 1, 8, 8)
    calibrate(net, x)  # initialise the learned quantizers
    net.train()
    layers = dict(quant_layers(net))
    fixed, free = layers["stage2.0"].w_quant, layers["stage2.4"].w_quant
    assert not fixed.learns_bits and free.learns_bits
    assert (fixed.b_min, fixed.b_max, fixed.bits) == (3, 3, 3)
    sizes = measure_layers(net, x[:1])
    s_w = weight_size_kb(sizes, torch.device("cpu"))
    expected = sum(layers[s.name].w_bits * s.params for s in sizes) / 8 / 1024
    assert float(s_w.detach()) == pytest.approx(expected)
    s_w.backward()
    assert all(p.grad is None or not p.grad.any() for p in fixed.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in free.parameters())
    # a strong budget pushes the free layers down, never the fixed one
    budget = BudgetPenalty(weight_budget_kb=0.1, lambda_w=10.0)
    budget.bind(sizes)
    params = [p for q in (fixed, free) for p in q.parameters()]
    opt = torch.optim.SGD(params, lr=0.05)
    for _ in range(50):
        opt.zero_grad()
        budget().backward()
        opt.step()
        fixed.clamp_()
        free.clamp_()
    assert fixed.bits == 3 and free.bits == 2
    # the smallest reachable size counts the fixed layer at its bits
    with pytest.raises(QexpError, match="layers set by layers.overrides at their bits"):
        check_reachable(budget, sizes)


# -- the preflight table -----------------------------------------------------------------------
def test_format_plan_lists_every_layer_with_its_settings():
    plan = _plan(
        [
            {"match": "stage2", "w_bits": 2},
            {"match": "fc", "float": True},
            {"match": "stem.0", "quantizer": {"weight": {"per_channel": False}}},
        ]
    )
    lines = format_plan(plan).splitlines()
    assert lines[0].split() == [
        "layer",
        "type",
        "role",
        "w_bits",
        "a_bits",
        "params",
        "quantizer",
        "set",
        "by",
    ]
    rows = {ln.split()[0]: ln.split() for ln in lines[2:]}
    assert list(rows) == NAMES
    assert rows["stage2.0"][:5] == ["stage2.0", "Conv2d", "body", "2", "4"]
    assert rows["stage2.0"][-1] == "overrides[0]"
    assert rows["fc"][3:5] == ["fp", "fp"] and rows["fc"][-1] == "overrides[1]"
    assert rows["stage1.0"][-1] == "-" and rows["stage1.0"][5] == str(4 * 4 * 9)
    assert "w: per_channel=False" in " ".join(rows["stem.0"])
    # every line has the same column positions
    assert len({ln.index("Conv2d") for ln in lines[2:6]}) == 1


def test_plan_json_names_the_rules():
    plan = _plan([{"match": "stage2", "w_bits": 2}])
    row = next(r for r in plan.to_json() if r["name"] == "stage2.4")
    assert row == {
        "name": "stage2.4",
        "kind": "Conv2d",
        "role": "body",
        "w_bits": 2,
        "a_bits": 4,
        "float": False,
        "params": 8 * 8 * 9,
        "quantizer": {},
        "rules": [0],
        "set_by": "overrides[0]",
    }


def test_quantizer_options_build_real_quantizers_through_hydra():
    node = {
        "weight": {"_target_": "qexp.quant.uniform.UniformQuantizer", "per_channel": True},
        "activation": {"_target_": "qexp.quant.uniform.UniformQuantizer"},
    }

    def factory(role, bits, options=None):
        if bits >= 32:
            return None
        spec = layer_quantizer_spec(node, role, options)
        return hydra.utils.instantiate(spec, bits=bits, role=role)

    net = _cnn()
    rules = [{"match": "stage1", "quantizer": {"weight": {"per_channel": False}}}]
    plan = resolve_plan(net, rules, BITS, 8, 8)
    quantize_model(net, factory, factory, BITS, 8, 8, plan=plan)
    per_channel = {n: m.w_quant.per_channel for n, m in quant_layers(net)}
    assert per_channel == {n: n != "stage1.0" for n in NAMES}
    assert all(isinstance(m, QuantLayer) for _, m in quant_layers(net))


def test_annotate_adds_the_plan_to_a_layer_table():
    net = _cnn()
    plan = resolve_plan(net, [{"match": "fc", "float": True}], BITS, 8, 8)
    quantize_model(net, _uniform, _uniform, BITS, 8, 8, plan=plan)
    x = torch.randn(4, 1, 8, 8)
    calibrate(net, x)
    table = plan.annotate(layer_table(net, x))
    assert [r["set_by"] for r in table] == ["-"] * 4 + ["overrides[0]"]
    assert [r["float"] for r in table] == [False] * 4 + [True]
