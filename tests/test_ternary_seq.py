"""Ternary (BitNet b1.58), per-token absmax and SEQ (ParetoQ) quantizers against independent
re-implementations: forward values, gradients and the number of levels per row."""

from __future__ import annotations

import math

import pytest
import torch

from qexp.quant.per_token import PerTokenQuantizer
from qexp.quant.seq import SEQQuantizer
from qexp.quant.ternary import TernaryQuantizer
from qexp.quant.wrap import LayerBits, quantize_model
from qexp.train.inspect_levels import distinct_per_row


def _weights(seed: int = 0, shape: tuple[int, ...] = (8, 40)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * torch.linspace(0.1, 2.0, shape[0]).view(-1, 1)


# -- ternary ---------------------------------------------------------------------------------
def _bitnet_reference(w: torch.Tensor, per_row: bool) -> torch.Tensor:
    """The paper's formula written out: s = mean|W| + eps, clip(round(W / s), -1, 1) * s."""
    s = (w.abs().mean(dim=1, keepdim=True) if per_row else w.abs().mean()) + 1e-5
    return torch.clamp(torch.round(w / s), -1, 1) * s


@pytest.mark.parametrize("per_row", [False, True])
def test_ternary_matches_the_absmean_formula(per_row: bool) -> None:
    w = _weights()
    q = TernaryQuantizer(2, "weight", per_row=per_row)
    torch.testing.assert_close(q.hard(w), _bitnet_reference(w, per_row))
    levels = distinct_per_row(q.hard(w))
    assert int(levels.max()) <= 3
    if not per_row:  # one scale: the whole tensor has 3 levels
        assert torch.unique(q.hard(w)).numel() == 3


def test_ternary_gradient_is_straight_through() -> None:
    w = _weights().requires_grad_(True)
    upstream = torch.randn(w.shape, generator=torch.Generator().manual_seed(1))
    out = TernaryQuantizer(2, "weight")(w)
    torch.testing.assert_close(out.detach(), _bitnet_reference(w.detach(), False))
    (out * upstream).sum().backward()
    torch.testing.assert_close(w.grad, upstream)


@pytest.mark.parametrize("bits", [4, 1, 3])
def test_ternary_takes_1_58_or_its_alias_2(bits: int) -> None:
    with pytest.raises(ValueError, match="w_bits=1.58"):
        TernaryQuantizer(bits, "weight")


def test_ternary_at_1_58_is_its_alias_2() -> None:
    w = _weights()
    q158, q2 = TernaryQuantizer(1.58, "weight"), TernaryQuantizer(2, "weight")
    torch.testing.assert_close(q158.hard(w), q2.hard(w), rtol=0, atol=0)
    torch.testing.assert_close(q158.hard(w), _bitnet_reference(w, False))
    # stored and sized at 2 bits, checked against 3 levels, whichever spelling
    assert (q158.bits, q158.max_levels) == (q2.bits, q2.max_levels) == (2, 3)


# -- per token -------------------------------------------------------------------------------
def test_per_token_matches_torch_fake_quant() -> None:
    x = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(2))
    x[0, 0] = 0.0  # an all-zero token keeps a positive scale
    q = PerTokenQuantizer(8, "activation")
    rows = x.reshape(-1, 16)
    scale = rows.abs().amax(dim=1).clamp(min=1e-5) / 127
    ref = torch.fake_quantize_per_channel_affine(
        rows, scale, torch.zeros(rows.shape[0], dtype=torch.int32), 0, -127, 127
    )
    torch.testing.assert_close(q.hard(x), ref.reshape(x.shape))
    # every token's largest magnitude is a level: absmax scaling clips nothing
    torch.testing.assert_close(q.hard(x).abs().amax(-1), x.abs().amax(-1))
    assert int(distinct_per_row(q.hard(x).reshape(-1, 16)).max()) <= 2**8


# -- SEQ -------------------------------------------------------------------------------------
def _seq_reference(w: torch.Tensor, alpha: torch.Tensor, n: int) -> torch.Tensor:
    """n equal bins of [-alpha, alpha] per row, each valued at its centre."""
    a = alpha.view(-1, 1)
    u = w / a
    k = torch.clamp(torch.floor((u + 1) * n / 2), 0, n - 1)
    return a * (2 * k + 1 - n) / n


def _seq_grads(
    w: torch.Tensor, alpha: torch.Tensor, n: int, upstream: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """SEQ's LSQ-style gradients written out: d/dw = 1 inside |w| < alpha; d/dalpha =
    L(u) - u inside and L(u) (the end level) outside, times 1 / sqrt(weights per row)."""
    a = alpha.view(-1, 1)
    u = w / a
    level = _seq_reference(w, alpha, n) / a
    inside = u.abs() < 1
    grad_w = upstream * inside
    grad_a = (upstream * torch.where(inside, level - u, level)).sum(dim=1)
    return grad_w, grad_a / math.sqrt(w.shape[1])


@pytest.mark.parametrize(("bits", "ternary", "n"), [(1.58, False, 3), (2, True, 3), (2, False, 4)])
def test_seq_forward_and_gradients(bits: float, ternary: bool, n: int) -> None:
    w0 = _weights(3)
    q = SEQQuantizer(bits, "weight", ternary=ternary)
    assert (q.bits, q.max_levels) == (2, n)
    q.bind_weight(w0)
    q.observe(w0)  # calibration: alpha = max|w| per row
    torch.testing.assert_close(q.alpha.detach(), w0.abs().amax(dim=1))
    with torch.no_grad():  # a clip inside the range, so some weights fall outside it
        q.alpha.mul_(0.6)
    alpha = q.alpha.detach().clone()
    w = w0.clone().requires_grad_(True)
    upstream = torch.randn(w.shape, generator=torch.Generator().manual_seed(4))
    out = q(w)
    torch.testing.assert_close(out.detach(), _seq_reference(w0, alpha, n))
    torch.testing.assert_close(q.hard(w0), _seq_reference(w0, alpha, n))
    (out * upstream).sum().backward()
    grad_w, grad_a = _seq_grads(w0, alpha, n, upstream)
    torch.testing.assert_close(w.grad, grad_w)
    torch.testing.assert_close(q.alpha.grad, grad_a)
    levels = distinct_per_row(q.hard(w0))
    assert int(levels.max()) == n  # clipped rows reach every level, never more


def test_seq_alpha_is_sized_by_the_wrapped_layer_and_learned() -> None:
    net = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 7), torch.nn.Linear(7, 3))

    def body(role: str, bits: int):
        return SEQQuantizer(bits, role, ternary=True) if role == "weight" else None

    quantize_model(net, body, body, LayerBits(2, 32), None, None)
    assert [tuple(m.w_quant.alpha.shape) for m in net] == [(5,), (7,), (3,)]
    x = torch.randn(4, 6)
    for m in net:
        m.w_quant.observe(m.weight)
    net(x).sum().backward()
    assert all(m.w_quant.alpha.grad is not None for m in net)
