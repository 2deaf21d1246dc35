"""Memory budget for learned mixed precision (Uhlich et al. 2020).

Sizes, in KB, of a network's quantized layers at their current bit widths:

- weights ``S_w = sum_l b_l N_l / 8 / 1024`` (N_l: weights of layer l; body and edge layers,
  32 bits where a layer is not quantized; biases, BatchNorm and scales are not counted);
- activations ``S_a = max_l`` (or ``sum_l``) ``b_l A_l / 8 / 1024`` (A_l: input activation
  values of layer l per sample, measured once with a forward hook).

The penalty added to the training loss is ``lambda_w relu(S_w - S_w0)^2 + lambda_a relu(S_a -
S_a0)^2``. Learned-precision quantizers (qexp.quant.dq) supply their bit width as a tensor whose
value is the integer bit width and whose gradient is that of the continuous (pre-ceil) one, so
the penalty moves d and q_max (or b) towards fewer bits while a budget is exceeded.

Layers whose bits are fixed (edge layers, and layers whose bits a ``layers.overrides`` rule
sets: qexp.quant.wrap.pin_bits turns their learned-precision quantizers into fixed-width ones)
count at those bits, as constants: the penalty moves only the layers that learn their bits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from qexp.errors import QexpError
from qexp.quant.base import Quantizer
from qexp.quant.layers import QuantLayer, quant_layers, quant_mode
from qexp.spec import BudgetSpec

ACT_MODES = ("max", "sum")
#: BudgetPenalty's options -> the config keys users write (conf/config.yaml ``budget:``)
_CONFIG_KEYS = {
    "weight_budget_kb": "budget.weight_kb",
    "act_budget_kb": "budget.act_kb",
    "act_budget_mode": "budget.act_mode",
    "budget_margin": "budget.margin",
    "weight_avg_bits": "budget.weight_avg_bits",
    "act_avg_bits": "budget.act_avg_bits",
}
_KB = 8 * 1024


def _kb(v: float) -> str:
    """A size for messages: enough digits to tell a small excess from equality."""
    return f"{v:.2f}" if v >= 0.1 else f"{v:.3g}"


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def quantizer_bits(q: Quantizer | None, device: torch.device) -> Tensor:
    """Bit width of ``q`` as a float tensor: differentiable for learned precision, 32 for None."""
    if q is None:
        return torch.tensor(32.0, device=device)
    if getattr(q, "learns_bits", False):
        return q.bits_tensor().float().to(device)
    return torch.tensor(float(q.bits), device=device)


@dataclass
class LayerSize:
    """Element counts of one quantized layer: weights and input activation values per sample."""

    name: str
    layer: QuantLayer
    params: int
    act_elems: int


@torch.no_grad()
def measure_layers(net: nn.Module, example: Tensor) -> list[LayerSize]:
    """N_l and A_l of every quantized layer of ``net``, from one forward of ``example``.

    The forward runs in eval mode with quantization off, so it neither initialises quantizers
    from a dummy batch nor touches BatchNorm statistics.
    """
    elems: dict[str, int] = {}
    hooks = []
    for name, layer in quant_layers(net):

        def record(mod: nn.Module, args: tuple, name: str = name) -> None:
            x = args[0]
            elems[name] = x[0].numel() if x.dim() > 1 else x.numel()

        hooks.append(layer.register_forward_pre_hook(record))
    was_training = net.training
    net.eval()
    try:
        with quant_mode(net, "off"):
            net(example)
    finally:
        net.train(was_training)
        for h in hooks:
            h.remove()
    return [
        LayerSize(name, layer, layer.weight.numel(), elems.get(name, 0))
        for name, layer in quant_layers(net)
    ]


def weight_size_kb(layers: list[LayerSize], device: torch.device) -> Tensor:
    """``S_w``: packed weight size in KB at the current bit widths (differentiable)."""
    total = torch.zeros((), device=device)
    for ls in layers:
        total = total + quantizer_bits(ls.layer.w_quant, device) * (ls.params / _KB)
    return total


def act_size_kb(layers: list[LayerSize], mode: str, device: torch.device) -> Tensor:
    """``S_a``: the largest (``max``) or total (``sum``) input activation size in KB."""
    sizes = [quantizer_bits(ls.layer.a_quant, device) * (ls.act_elems / _KB) for ls in layers]
    if not sizes:
        return torch.zeros((), device=device)
    stacked = torch.stack(sizes)
    return stacked.max() if mode == "max" else stacked.sum()


class BudgetPenalty:
    """Weight / activation memory budgets and their quadratic penalty.

    Give each budget either in KB (``weight_budget_kb``) or as an average bit width that is
    converted to KB for the model at hand (``weight_avg_bits``: that many bits for every
    quantized weight, edge layers included; ``act_avg_bits``: that many bits for the layer
    inputs, combined by ``act_budget_mode``). ``None`` everywhere means no budget.

    Args:
        weight_budget_kb: S_w0 in KB.
        act_budget_kb: S_a0 in KB.
        act_budget_mode: ``"max"`` (largest layer input, the paper's) or ``"sum"``.
        weight_avg_bits: S_w0 as average bits per weight.
        act_avg_bits: S_a0 as average bits per activation value.
        lambda_w: weight of the weight-size penalty.
        lambda_a: weight of the activation-size penalty.
        budget_margin: the penalty aims this fraction below each budget (qexp's choice, not
            the paper's: the quadratic penalty fades as the excess shrinks, so aiming exactly
            at the budget tends to stall a hair above it); whether a budget is met is always
            checked against the budget itself. 0 gives the paper's exact penalty.
    """

    def __init__(
        self,
        weight_budget_kb: float | None = None,
        act_budget_kb: float | None = None,
        act_budget_mode: str = "max",
        weight_avg_bits: float | None = None,
        act_avg_bits: float | None = None,
        lambda_w: float = 0.1,
        lambda_a: float = 0.1,
        budget_margin: float = 0.05,
    ) -> None:
        for key, value in (
            ("weight_budget_kb", weight_budget_kb),
            ("act_budget_kb", act_budget_kb),
            ("weight_avg_bits", weight_avg_bits),
            ("act_avg_bits", act_avg_bits),
        ):
            if value is not None and not (_is_number(value) and value > 0):
                raise ValueError(f"{key}={value!r}: use null or a positive number")
        if weight_budget_kb is not None and weight_avg_bits is not None:
            raise ValueError("set weight_budget_kb or weight_avg_bits, not both")
        if act_budget_kb is not None and act_avg_bits is not None:
            raise ValueError("set act_budget_kb or act_avg_bits, not both")
        if act_budget_mode not in ACT_MODES:
            raise ValueError(f"act_budget_mode={act_budget_mode!r}: use max | sum")
        for key, value in (("lambda_w", lambda_w), ("lambda_a", lambda_a)):
            if not (_is_number(value) and value >= 0):
                raise ValueError(f"{key}={value!r}: use a number >= 0")
        self.weight_budget_kb = weight_budget_kb
        self.act_budget_kb = act_budget_kb
        self.act_budget_mode = act_budget_mode
        self.weight_avg_bits = weight_avg_bits
        self.act_avg_bits = act_avg_bits
        self.lambda_w, self.lambda_a = float(lambda_w), float(lambda_a)
        if not (_is_number(budget_margin) and 0 <= budget_margin < 1):
            raise ValueError(f"budget_margin={budget_margin!r}: use a number in [0, 1)")
        self.aim = 1.0 - float(budget_margin)
        self.layers: list[LayerSize] = []

    @property
    def active(self) -> bool:
        """Whether any budget is set."""
        return any(
            v is not None
            for v in (
                self.weight_budget_kb,
                self.act_budget_kb,
                self.weight_avg_bits,
                self.act_avg_bits,
            )
        )

    def bind(self, layers: list[LayerSize]) -> None:
        """Use the measured layer sizes; converts average-bit budgets to KB."""
        self.layers = layers
        if self.weight_avg_bits is not None:
            n = sum(ls.params for ls in layers)
            self.weight_budget_kb = self.weight_avg_bits * n / _KB
        if self.act_avg_bits is not None:
            a = [ls.act_elems for ls in layers] or [0]
            total = max(a) if self.act_budget_mode == "max" else sum(a)
            self.act_budget_kb = self.act_avg_bits * total / _KB

    # -- sizes and penalty -----------------------------------------------------------------------
    def _device(self) -> torch.device:
        return self.layers[0].layer.weight.device if self.layers else torch.device("cpu")

    def weight_kb(self) -> Tensor:
        return weight_size_kb(self.layers, self._device())

    def act_kb(self) -> Tensor:
        return act_size_kb(self.layers, self.act_budget_mode, self._device())

    def __call__(self) -> Tensor:
        """The penalty at the current bit widths (differentiable w.r.t. quantizer parameters)."""
        s_w, s_a = self.weight_kb(), self.act_kb()
        penalty = torch.zeros((), device=s_w.device)
        if self.weight_budget_kb is not None:
            target_w = self.weight_budget_kb * self.aim
            penalty = penalty + self.lambda_w * torch.relu(s_w - target_w) ** 2
        if self.act_budget_kb is not None:
            target_a = self.act_budget_kb * self.aim
            penalty = penalty + self.lambda_a * torch.relu(s_a - target_a) ** 2
        return penalty

    def violations(self) -> list[str]:
        """Plain descriptions of the budgets the network exceeds now (empty: all met)."""
        out = []
        with torch.no_grad():
            s_w, s_a = float(self.weight_kb()), float(self.act_kb())
        # a hair of slack: sizes are sums of floats, budgets typed by hand
        if self.weight_budget_kb is not None and s_w > self.weight_budget_kb + 1e-9:
            out.append(f"weights {_kb(s_w)} KB > {_kb(self.weight_budget_kb)} KB")
        if self.act_budget_kb is not None and s_a > self.act_budget_kb + 1e-9:
            out.append(
                f"activations ({self.act_budget_mode}) {_kb(s_a)} KB > {_kb(self.act_budget_kb)} KB"
            )
        return out

    def summary(self) -> dict[str, Any]:
        """Budgets as configured and resolved, for metrics.json."""
        return {
            "weight_budget_kb": self.weight_budget_kb,
            "act_budget_kb": self.act_budget_kb,
            "act_budget_mode": self.act_budget_mode,
            "lambda_w": self.lambda_w,
            "lambda_a": self.lambda_a,
            "budget_margin": 1.0 - self.aim,
        }


def fewest_bits(q: Quantizer | None) -> int:
    """The fewest bits ``q`` can reach: its lower bound if it learns bits, else its bits."""
    if q is None:
        return 32
    return int(getattr(q, "min_bits", q.bits)) if getattr(q, "learns_bits", False) else q.bits


def smallest_sizes_kb(layers: list[LayerSize], act_mode: str) -> tuple[float, float]:
    """(S_w, S_a) with every quantizer at its fewest bits: what no training can go below."""
    s_w = sum(fewest_bits(ls.layer.w_quant) * ls.params for ls in layers) / _KB
    acts = [fewest_bits(ls.layer.a_quant) * ls.act_elems / _KB for ls in layers] or [0.0]
    return s_w, (max(acts) if act_mode == "max" else sum(acts))


def check_reachable(budget: BudgetPenalty, layers: list[LayerSize]) -> None:
    """Raise QexpError if a bound budget lies below the smallest size the model can reach.

    That size counts edge layers and layers fixed by ``layers.overrides`` at their bits,
    learned-precision layers at their ``b_min`` and fixed quantizers at their bits; the
    message names it, so a run that could never meet its budget is refused before it starts.
    """
    s_w, s_a = smallest_sizes_kb(layers, budget.act_budget_mode)
    checks = (
        ("weight", budget.weight_budget_kb, s_w, budget.weight_avg_bits),
        ("act", budget.act_budget_kb, s_a, budget.act_avg_bits),
    )
    for kind, target, smallest, avg_bits in checks:
        if target is None or target >= smallest - 1e-9:
            continue
        given = (
            f"budget.{kind}_avg_bits={avg_bits} ({_kb(target)} KB)"
            if avg_bits is not None
            else f"budget.{kind}_kb={_kb(target)} KB"
        )
        raise QexpError(
            f"{given} is below the smallest size this model can reach, "
            f"{_kb(smallest)} KB (edge layers and layers set by layers.overrides at their bits, "
            "the others at b_min): raise the budget, or lower b_min, layers.first_bits / "
            "layers.last_bits or the bits of layers.overrides"
        )


def budget_from_spec(spec: BudgetSpec) -> BudgetPenalty:
    """The penalty of the run's ``budget`` node; bad values raise a one-line QexpError that
    names the config keys."""
    try:
        return BudgetPenalty(**spec.penalty_options())
    except (TypeError, ValueError) as exc:
        text = str(exc)
        for option, key in _CONFIG_KEYS.items():
            text = text.replace(option, key)
        raise QexpError(f"budget: {text}") from None
