"""Learned quantizers (DoReFa, PACT, LSQ, Uhlich et al. U1/U2/U3/pow2) against references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from qexp.errors import QexpError
from qexp.quant.dorefa import DoReFaQuantizer
from qexp.quant.dq import DQU1Quantizer, DQU2Quantizer, DQU3Quantizer, dq_pow2
from qexp.quant.lsq import LSQQuantizer
from qexp.quant.pact import PACTQuantizer
from qexp.train.inspect_levels import distinct_per_row


def _set(q, signed: bool, **values: float) -> None:
    """Mark ``q`` calibrated with the given sign and parameter values."""
    q._set_calibrated()
    q.signed_state.fill_(int(signed))
    q._sign = int(signed)
    with torch.no_grad():
        for name, v in values.items():
            getattr(q, name).fill_(v)


# -- LSQ ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("role", ["weight", "activation"])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_lsq_round_then_clamp_option_matches_torch_learnable_fake_quant(role, bits):
    torch.manual_seed(bits)
    if role == "weight":
        x = torch.randn(16, 8, 3, 3) * 0.2
        q_n, q_p, n = 2 ** (bits - 1), 2 ** (bits - 1) - 1, x.numel()
    else:
        x = torch.relu(torch.randn(8, 4, 5, 5)) * 2.0
        q_n, q_p, n = 0, 2**bits - 1, x[0].numel()
    q = LSQQuantizer(bits, role, clip_first=False)
    q.observe(x)  # initialises the step from this tensor
    s0 = float(q.step.detach())
    assert s0 == pytest.approx(float(2 * x.abs().mean() / math.sqrt(q_p)), rel=1e-6)
    assert q.q_range() == (q_n, q_p)
    upstream = torch.randn_like(x)

    xa = x.clone().requires_grad_(True)
    (q(xa) * upstream).sum().backward()

    xr = x.clone().requires_grad_(True)
    scale = torch.tensor([s0], requires_grad=True)
    ref = torch._fake_quantize_learnable_per_tensor_affine(
        xr, scale, torch.tensor([0.0]), -q_n, q_p, 1.0 / math.sqrt(n * q_p)
    )
    (ref * upstream).sum().backward()

    torch.testing.assert_close(q(x).detach(), ref.detach(), rtol=0, atol=1e-6)
    torch.testing.assert_close(xa.grad, xr.grad)
    torch.testing.assert_close(q.step.grad.reshape(1), scale.grad, rtol=1e-4, atol=1e-6)
    # hard() and grid() describe the same levels
    grid = q.grid(x)
    assert grid.num_levels == q_n + q_p + 1
    torch.testing.assert_close(q.hard(x), grid.snap(x), rtol=0, atol=1e-6)


def lsq_net_reference(x, s, q_n, q_p, g):
    """LSQ as the paper and lsq-net write it: scale the step's gradient, clip, round (STE)."""
    s = (s - s * g).detach() + s * g
    v = torch.clamp(x / s, -q_n, q_p)
    v = (v.round() - v).detach() + v
    return v * s


@pytest.mark.parametrize("role", ["weight", "activation"])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_lsq_default_is_the_papers_clip_then_round(role, bits):
    torch.manual_seed(bits)
    s0 = 0.1
    if role == "weight":
        q_n, q_p = 2 ** (bits - 1), 2 ** (bits - 1) - 1
        x = torch.randn(8, 4, 3, 3) * 0.1 * q_p
        n = x.numel()
    else:
        q_n, q_p = 0, 2**bits - 1
        x = torch.relu(torch.randn(6, 4, 5, 5)) * 0.1 * q_p
        n = x[0].numel()
    # values within half a step beyond each end: where the two range tests disagree
    x.view(-1)[:4] = torch.tensor([q_p + 0.2, q_p + 0.45, -q_n - 0.3, q_p + 0.9]) * s0
    g = 1.0 / math.sqrt(n * q_p)
    q = LSQQuantizer(bits, role)
    _set(q, role == "weight", step=s0)
    upstream = torch.randn_like(x)
    xa = x.clone().requires_grad_(True)
    (q(xa) * upstream).sum().backward()
    xr = x.clone().requires_grad_(True)
    sr = torch.tensor(s0, requires_grad=True)
    ref = lsq_net_reference(xr, sr, q_n, q_p, g)
    (ref * upstream).sum().backward()
    torch.testing.assert_close(q(x).detach(), ref.detach(), rtol=0, atol=1e-6)
    torch.testing.assert_close(xa.grad, xr.grad)
    torch.testing.assert_close(q.step.grad, sr.grad, rtol=1e-4, atol=1e-7)
    # at v/s = Q_P + 0.2 the paper's step gradient is Q_P and the input gets none
    one = torch.full((1, 1), (q_p + 0.2) * s0)  # one value: N = 1, so g = 1 / sqrt(Q_P)
    g = 1.0 / math.sqrt(q_p)
    q.zero_grad()
    xo = one.clone().requires_grad_(True)
    q(xo).sum().backward()
    assert q.step.grad.item() == pytest.approx(q_p * g, rel=1e-5) and xo.grad.item() == 0.0
    torch_form = LSQQuantizer(bits, role, clip_first=False)
    _set(torch_form, role == "weight", step=s0)
    xo = one.clone().requires_grad_(True)
    torch_form(xo).sum().backward()
    assert torch_form.step.grad.item() == pytest.approx(-0.2 * g, rel=1e-4)
    assert xo.grad.item() == 1.0


def test_lsq_rejects_signed_one_bit():
    with pytest.raises(ValueError, match="at least 2 bits"):
        LSQQuantizer(1, "weight")


# -- Uhlich et al.: U3 gradients -----------------------------------------------------------------
@pytest.mark.parametrize("signed", [True, False])
def test_u3_gradients_match_closed_form(signed):
    d0, qmax0 = 0.3, 1.0  # q_max not a multiple of d: the end level is 3 d = 0.9
    q = DQU3Quantizer(8, "weight" if signed else "activation", signed=signed, b_max=8)
    _set(q, signed, d=d0, q_max=qmax0)
    xs = [-2.0, -1.0, -0.7, -0.44, -0.1, 0.0, 0.2, 0.46, 0.8, 0.99, 1.01, 1.5, 3.0]
    x_min = -qmax0 if signed else 0.0
    for x in xs:
        q.zero_grad()
        out = q(torch.tensor(x))
        out.backward()
        qx = float(out.detach())
        inside = x_min <= x <= qmax0
        want_d = (qx - x) / d0 if inside else 0.0
        # outside: sign(x) for signed grids; unsigned x < 0 clips to 0, which has no q_max in it
        want_q = 0.0 if inside else (math.copysign(1.0, x) if (signed or x > 0) else 0.0)
        assert q.d.grad.item() == pytest.approx(want_d, abs=1e-6), x
        assert q.q_max.grad.item() == pytest.approx(want_q, abs=1e-6), x
        # the forward is d * round(clip(x, x_min, q_max) / d)
        assert qx == pytest.approx(d0 * round(min(max(x, x_min), qmax0) / d0), abs=1e-6)


@pytest.mark.parametrize(
    ("d", "q_max", "signed", "want"),
    [
        (1.0, 1.0, True, 2),
        (1.0, 3.0, True, 3),
        (1.0, 3.5, True, 4),
        (0.1, 0.7, True, 4),  # q_max / d = 7 up to float error: still 4 bits
        (0.1, 0.71, True, 4),  # 7.1 steps: the grid uses 7 (15 levels)
        (0.01, 1.27, True, 8),
        (1.0, 1.0, False, 1),
        (1.0, 3.0, False, 2),
        (1.0, 3.5, False, 3),
        (0.5, 7.5, False, 4),
        (0.5, 7.6, False, 4),  # 15.2 steps: the grid uses 15 (16 levels)
    ],
)
def test_u3_inferred_bits_match_formula(d, q_max, signed, want):
    q = DQU3Quantizer(8, "weight", signed=signed, b_min=1, b_max=8)
    _set(q, signed, d=d, q_max=q_max)
    n = round(q_max / d)  # the end level is d round(q_max / d)
    formula = math.ceil(math.log2(n + 1) + (1 if signed else 0) - 1e-9)
    assert want == formula
    assert q.bits == want
    assert float(q.bits_tensor().detach()) == want
    # the grid never has more levels than the bits allow
    x = torch.linspace(-3 * q_max, 3 * q_max, 20001)
    levels = torch.unique(q.hard(x)).numel()
    assert levels <= 2**want
    assert q.grid(x).num_levels == levels


def _levels(q, top: float) -> int:
    """Brute force: distinct outputs of ``q.hard`` over a dense sweep well past its range."""
    x = torch.linspace(-3 * top, 3 * top, 60001)
    return torch.unique(q.hard(x)).numel()


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("ratio", [1.0, 1.4, 1.6, 2.6, 3.2, 3.49, 3.6, 6.6, 7.2, 7.6, 14.6, 15.4])
def test_u3_bits_are_those_of_the_grid_the_forward_uses(ratio, signed):
    d = 0.1
    q = DQU3Quantizer(8, "weight" if signed else "activation", signed=signed, b_min=1, b_max=8)
    _set(q, signed, d=d, q_max=d * ratio)
    levels = _levels(q, d * ratio)
    need = max(math.ceil(math.log2(levels)), 2 if signed else 1)
    assert q.bits == need, (ratio, levels)
    assert float(q.bits_tensor().detach()) == need  # what the budget penalises and reports
    if signed and ratio == 3.2:
        assert levels == 7 and q.bits == 3  # the example: 7 levels need 3 bits, not 4


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("bits", [2, 3, 4, 5])
@pytest.mark.parametrize("kind", ["u1", "u2"])
def test_u1_u2_bits_match_the_levels_of_their_grid(kind, bits, signed):
    role = "weight" if signed else "activation"
    cls = DQU1Quantizer if kind == "u1" else DQU2Quantizer
    q = cls(8, role, signed=signed, b_min=1, b_max=8)
    _set(q, signed, b=bits + 0.3, **({"d": 0.07} if kind == "u1" else {"q_max": 0.9}))
    top = float(q._dq()[1].detach())
    levels = _levels(q, top)
    assert q.bits == bits and math.ceil(math.log2(levels)) == bits, levels


def test_u3_bits_tensor_has_the_continuous_gradient():
    q = DQU3Quantizer(8, "weight", b_max=8)
    _set(q, True, d=0.1, q_max=0.5)
    b = q.bits_tensor()
    b.backward()
    # b = log2(q_max / d + 1) + 1: db/dq_max = 1 / (ln2 (q_max + d)), db/dd = -q_max / d * that
    k = 1 / (math.log(2) * (0.5 + 0.1))
    assert q.q_max.grad.item() == pytest.approx(k, rel=1e-5)
    assert q.d.grad.item() == pytest.approx(-0.5 / 0.1 * k, rel=1e-5)


def test_u3_clamp_keeps_bits_within_bounds_and_d_below_q_max():
    q = DQU3Quantizer(4, "weight", b_min=2)
    _set(q, True, d=0.001, q_max=1.0)  # would be 11 bits
    q.clamp_()
    assert q.bits == 4 and q.d.item() <= q.q_max.item()
    _set(q, True, d=5.0, q_max=1.0)  # d > q_max
    q.clamp_()
    assert q.d.item() <= q.q_max.item() and q.bits == 2
    _set(q, True, d=0.01, q_max=-3.0)
    q.clamp_()
    assert q.q_max.item() > 0 and 2 <= q.bits <= 4
    p = DQU3Quantizer(4, "weight", pow2_step=True)
    _set(p, True, d=0.003, q_max=1.0)
    p.clamp_()
    x = torch.linspace(-2, 2, 5001)
    assert p.bits <= 4 and torch.unique(p.hard(x)).numel() <= 16


# -- U1 / U2 / U3 agree ---------------------------------------------------------------------------
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("bits", [2, 3, 4, 6])
def test_u1_u2_u3_agree_on_equivalent_parameters(signed, bits):
    d = 0.137
    q_max = d * (2 ** (bits - 1) - 1 if signed else 2**bits - 1)
    role = "weight" if signed else "activation"
    u1 = DQU1Quantizer(bits, role, signed=signed)
    u2 = DQU2Quantizer(bits, role, signed=signed)
    u3 = DQU3Quantizer(bits, role, signed=signed)
    _set(u1, signed, b=bits, d=d)
    _set(u2, signed, b=bits, q_max=q_max)
    _set(u3, signed, d=d, q_max=q_max)
    torch.manual_seed(0)
    x = torch.randn(4000) * q_max
    y1, y2, y3 = u1(x), u2(x), u3(x)
    torch.testing.assert_close(y1, y3, rtol=0, atol=1e-6)
    torch.testing.assert_close(y2, y3, rtol=0, atol=1e-6)
    assert u1.bits == u2.bits == u3.bits == bits
    for q in (u1, u2, u3):
        torch.testing.assert_close(q.hard(x), q.grid(x).snap(x), rtol=0, atol=1e-6)
        assert torch.unique(q.hard(x)).numel() <= 2**bits


def test_weights_initialise_from_max_abs_at_the_initial_bits_when_observed():
    q = DQU3Quantizer(4, "weight")
    assert q.bits == 4 and not bool(q.initialized)
    w = torch.randn(8, 16) * 0.3
    with pytest.raises(RuntimeError, match="calibration"):
        q(w)  # no silent initialisation outside the calibration phase
    q.observe(w)
    assert q.q_max.item() == pytest.approx(float(w.abs().max()))
    assert q.d.item() == pytest.approx(float(w.abs().max()) / 7)
    assert q.bits == 4
    a = DQU3Quantizer(3, "activation")
    x = torch.relu(torch.randn(32, 10))
    a.observe(x)
    assert not a.signed and a.q_max.item() == pytest.approx(float(x.max()))
    assert a.d.item() == pytest.approx(float(x.max()) / 7) and a.bits == 3


# -- power of two -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("q_min", "q_max", "want"),
    [
        (1.0, 1.0, 1),
        (2.0**-3, 1.0, 3),
        (2.0**-4, 1.0, 4),
        (2.0**-6, 2.0, 4),
        (2.0**-2, 1.0, 3),
        (0.5, 1.0, 2),
    ],
)
def test_pow2_p3_inferred_bits_match_formula(q_min, q_max, want):
    q = dq_pow2(8, "weight", param="p3", b_min=1, b_max=8)
    _set(q, True, q_min=q_min, q_max=q_max)
    formula = math.ceil(math.log2(math.log2(q_max / q_min) + 1) + 1)
    assert want == formula == q.bits
    x = torch.linspace(-4 * q_max, 4 * q_max, 40001)
    hard = q.hard(x)
    m = round(math.log2(q_max / q_min)) + 1
    assert torch.unique(hard).numel() == 2 * m <= 2**want
    # every level is a signed power of two within [q_min, q_max]
    mags = torch.unique(hard.abs())
    assert torch.all(torch.log2(mags) == torch.round(torch.log2(mags)))
    assert float(mags.min()) == q_min and float(mags.max()) == q_max


@pytest.mark.parametrize("param", ["p1", "p2", "p3"])
@pytest.mark.parametrize("with_zero", [False, True])
def test_pow2_parametrizations_are_honest(param, with_zero):
    q = dq_pow2(4, "weight", param=param, with_zero=with_zero)
    torch.manual_seed(1)
    w = torch.randn(16, 64) * 0.2
    q.observe(w)
    out = q(w)
    assert q.bits == 4
    assert torch.unique(out).numel() <= 16
    assert bool((out == 0).any()) == with_zero
    out.sum().backward()  # learned parameters receive gradients through the range ends
    with pytest.raises(QexpError, match="estimator=ste"):
        q.grid(w)  # non-uniform levels: estimators that need a grid get a clear message


@pytest.mark.parametrize("ste", ["log", "linear"])
def test_pow2_gradients_follow_the_authors_or_the_linear_form(ste):
    q = dq_pow2(4, "weight", param="p3", ste=ste)
    q_min, q_max = 0.1375, 1.3  # snapped: 2^-3 and 2^0
    _set(q, True, q_min=q_min, q_max=q_max)
    lo, hi = 0.125, 1.0
    for x in [-2.0, -0.9, -0.3, -0.05, 0.02, 0.13, 0.2, 0.37, 0.7, 1.0, 1.2, 3.0]:
        q.zero_grad()
        xt = torch.tensor(x, requires_grad=True)
        out = q(xt)
        out.backward()
        a, sign = abs(x), math.copysign(1.0, x)
        inside = lo <= a <= hi
        # closed forms: the value, and dQ/dx, dQ/dq_max, dQ/dq_min
        want = sign * (2.0 ** round(math.log2(a)) if inside else (hi if a > hi else lo))
        assert out.item() == pytest.approx(want), x
        if ste == "log":  # straight-through on the rounding in the log domain (authors' code)
            gx = want / x if inside else 0.0
            g_max, g_min = sign * hi / q_max * (a > hi), sign * lo / q_min * (a < lo)
        else:
            gx = 1.0 if inside else 0.0
            g_max, g_min = sign * (a > hi), sign * (a < lo)
        assert xt.grad.item() == pytest.approx(gx, rel=1e-5), x
        assert q.q_max.grad.item() == pytest.approx(g_max, rel=1e-5, abs=1e-9), x
        assert q.q_min.grad.item() == pytest.approx(g_min, rel=1e-5, abs=1e-9), x
    if ste == "log":
        x = torch.linspace(0.126, 0.99, 1001, requires_grad=True)
        q(x).sum().backward()
        assert x.grad.min() >= 2**-0.5 - 1e-4 and x.grad.max() <= 2**0.5 + 1e-4


@pytest.mark.parametrize("param", ["p1", "p2", "p3"])
def test_pow2_param_key_picks_the_parametrization_from_the_config(param):
    from conftest import compose_config
    from hydra.utils import instantiate

    from qexp.config.validate import check_component
    from qexp.quant.dq import POW2_PARAMETRIZATIONS

    cfg = compose_config("quantizer=dq_pow2", f"quantizer.weight.param={param}")
    node = OmegaConf.to_container(cfg.quantizer.weight, resolve=True)
    check_component("quantizer.weight", node)
    node.pop("name", None)
    q = instantiate(node, bits=4, role="weight")
    assert type(q) is POW2_PARAMETRIZATIONS[param] and q.param == param
    learned = {"p1": {"b", "q_max"}, "p2": {"b", "q_min"}, "p3": {"q_max", "q_min"}}[param]
    assert {n for n, _ in q.named_parameters()} == learned
    with pytest.raises(QexpError, match="p1 | p2 | p3"):
        check_component("quantizer.weight", {**node, "param": "p4"})


def test_pow2_p1_p2_p3_agree():
    kw = dict(role="weight", with_zero=False, b_max=8)
    p1, p2, p3 = (dq_pow2(4, param=p, **kw) for p in ("p1", "p2", "p3"))
    _set(p1, True, b=4, q_max=0.5)
    _set(p2, True, b=4, q_min=2.0**-8)
    _set(p3, True, q_min=2.0**-8, q_max=0.5)
    x = torch.randn(3000)
    torch.testing.assert_close(p1(x), p3(x))
    torch.testing.assert_close(p2(x), p3(x))


# -- DoReFa and PACT ------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_dorefa_weights_match_the_formula(bits):
    torch.manual_seed(bits)
    w = torch.randn(8, 4, 3, 3) * 0.7
    q = DoReFaQuantizer(bits, "weight")
    wn = w.numpy().astype(np.float64)
    t = np.tanh(wn)
    n = 2**bits - 1
    ref = 2 * (np.round((t / (2 * np.abs(t).max()) + 0.5) * n) / n) - 1
    np.testing.assert_allclose(q(w).detach().numpy(), ref, atol=1e-6)
    assert torch.unique(q.hard(w)).numel() <= 2**bits
    # only the round is straight-through: the gradient is that of tanh(w) / max|tanh(w)|
    wa = w.clone().requires_grad_(True)
    g = torch.randn_like(w)
    (q(wa) * g).sum().backward()
    wr = w.clone().requires_grad_(True)
    tr = torch.tanh(wr)
    (tr / tr.abs().max() * g).sum().backward()
    torch.testing.assert_close(wa.grad, wr.grad)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_dorefa_grid_applies_to_the_tanh_normalised_weight(bits):
    torch.manual_seed(bits)
    w = torch.randn(16, 8, 3, 3) * 0.3
    q = DoReFaQuantizer(bits, "weight")
    u = q.grid_input(w)
    t = torch.tanh(w)
    torch.testing.assert_close(u, t / t.abs().max())  # written out independently
    torch.testing.assert_close(q.grid(w).snap(u), q.hard(w), rtol=0, atol=1e-6)
    a = DoReFaQuantizer(bits, "activation")
    x = torch.rand(100) * 2 - 0.5
    assert a.grid_input(x) is x and DoReFaQuantizer(1, "weight").grid_input(w) is w


def test_dorefa_one_bit_and_activations():
    w = torch.randn(6, 20)
    q = DoReFaQuantizer(1, "weight")
    torch.testing.assert_close(q(w), torch.where(w >= 0, 1.0, -1.0) * w.abs().mean())
    a = DoReFaQuantizer(2, "activation")
    x = torch.tensor([-0.5, 0.1, 0.2, 0.5, 0.9, 1.7], requires_grad=True)
    y = a(x)
    torch.testing.assert_close(y.detach(), torch.tensor([0.0, 0.0, 1 / 3, 2 / 3, 1.0, 1.0]))
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.tensor([0.0, 1.0, 1.0, 1.0, 1.0, 0.0]))


def test_pact_alpha_gradient_and_levels():
    q = PACTQuantizer(2, alpha_init=1.2)
    x = torch.tensor([-0.3, 0.1, 0.5, 1.0, 1.2, 1.5, 4.0], requires_grad=True)
    g = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0])
    y = q(x)
    (y * g).sum().backward()
    # dy/dalpha = 1 where x >= alpha; dy/dx = 1 inside (0, alpha)
    assert q.alpha.grad.item() == pytest.approx(5.0 + 6.0 + 7.0)
    torch.testing.assert_close(x.grad, torch.tensor([0.0, 2.0, 3.0, 4.0, 0.0, 0.0, 0.0]))
    step = 1.2 / 3
    want = [0.0, 0.0, step, 2 * step, 1.2, 1.2, 1.2]
    torch.testing.assert_close(y.detach(), torch.tensor(want))
    torch.testing.assert_close(q.hard(x.detach()), torch.tensor(want))
    with pytest.raises(ValueError, match="activation"):
        PACTQuantizer(2, "weight")


@pytest.mark.parametrize("signed", [False, True])
def test_pact_input_and_alpha_gradients_split_at_zero_and_alpha(signed):
    alpha = 1.2
    q = PACTQuantizer(3, alpha_init=alpha, signed=signed)
    xs = [-2.0, -alpha, -0.4, 0.0, 0.3, alpha - 1e-4, alpha, 2.5]
    for x in xs:
        q.zero_grad()
        xt = torch.tensor(x, requires_grad=True)
        q(xt).backward()
        # closed form (module doc): dy/dx = 1 on [0, alpha) (signed: (-alpha, alpha)),
        # dy/dalpha = 1 where x >= alpha (signed: -1 where x <= -alpha); never both
        low_inside = (x > -alpha) if signed else (x >= 0.0)
        want_x = 1.0 if (low_inside and x < alpha) else 0.0
        want_a = 1.0 if x >= alpha else (-1.0 if signed and x <= -alpha else 0.0)
        assert xt.grad.item() == want_x, x
        assert q.alpha.grad.item() == want_a, x


def test_pact_alpha_initialises_from_first_batch():
    q = PACTQuantizer(4)
    x = torch.relu(torch.randn(64, 8))
    q.observe(x)
    assert q.alpha.item() == pytest.approx(float(x.max()))
    assert int(distinct_per_row(q.hard(x).reshape(1, -1)).max()) <= 16
