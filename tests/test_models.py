"""Tests for qexp.models: shapes, block structure for block replacement, layer order, YAMLs."""

from __future__ import annotations

import copy
import urllib.error
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torchvision
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import nn

from qexp.errors import QexpError
from qexp.models import (
    MLP,
    MobileNetV2,
    MobileNetV3Small,
    ResNet18,
    ResNet20,
    SmallCNN,
    VGGSmall,
    make_activation,
)

CONF_DIR = Path(__file__).resolve().parents[1] / "conf" / "model"

# name -> (factory, (in_channels, image_size), num_classes)
CASES: dict[str, tuple[Callable[..., nn.Module], tuple[int, int], int]] = {
    "small_cnn_28": (SmallCNN, (1, 28), 10),
    "small_cnn_8": (lambda **kw: SmallCNN(width=8, **kw), (1, 8), 10),
    "small_cnn_hardtanh": (lambda **kw: SmallCNN(activation="hardtanh", **kw), (3, 32), 7),
    "mlp": (MLP, (1, 28), 10),
    "mlp_deep_dropout": (lambda **kw: MLP(hidden=[32, 24, 16], dropout=0.1, **kw), (1, 8), 10),
    "resnet20": (ResNet20, (3, 32), 10),
    "resnet20_small_image": (lambda **kw: ResNet20(width=8, **kw), (1, 8), 4),
    "vgg_small_32": (lambda **kw: VGGSmall(width=16, **kw), (3, 32), 10),
    "vgg_small_28_fc": (lambda **kw: VGGSmall(width=16, fc_hidden=32, **kw), (1, 28), 10),
    "resnet18": (ResNet18, (3, 32), 10),
    "resnet18_gray_small_input": (
        lambda **kw: ResNet18(small_input=True, activation="hardtanh", **kw),
        (1, 16),
        5,
    ),
    "mobilenet_v2": (MobileNetV2, (3, 32), 10),
    "mobilenet_v2_gray": (lambda **kw: MobileNetV2(width_mult=0.5, **kw), (1, 32), 100),
    "mobilenet_v3_small": (MobileNetV3Small, (3, 32), 10),
    "mobilenet_v3_small_hardtanh": (
        lambda **kw: MobileNetV3Small(activation="hardtanh", **kw),
        (3, 32),
        10,
    ),
}


def build(case: str, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    """The model of ``case`` in eval mode, and a batch of 3 matching inputs."""
    factory, (channels, size), num_classes = CASES[case]
    torch.manual_seed(seed)
    model = factory(num_classes=num_classes, in_channels=channels, image_size=size)
    x = torch.randn(3, channels, size, size)
    return model.eval(), x


def quant_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Conv2d / Linear layers in registration order (as the quantization wrapper sees them)."""
    return [(n, m) for n, m in model.named_modules() if type(m) in (nn.Conv2d, nn.Linear)]


def inside(name: str, block: str) -> bool:
    return name == block or name.startswith(block + ".")


@pytest.mark.parametrize("case", CASES)
def test_output_shape_train_and_eval(case: str) -> None:
    model, x = build(case)
    num_classes = CASES[case][2]
    for train in (True, False):
        model.train(train)
        out = model(x)
        assert out.shape == (x.shape[0], num_classes)
        assert torch.isfinite(out).all()
    model.train()
    model(x).sum().backward()


@pytest.mark.parametrize("case", CASES)
def test_structure_stem_blocks_head(case: str) -> None:
    """Blocks resolve, run once each in order, chain into each other, and the first/last
    registered Conv2d/Linear layers are the stem and the classifier outside every block."""
    model, x = build(case)
    blocks = model.block_names()
    assert len(set(blocks)) == len(blocks)
    for a in blocks:
        model.get_submodule(a)
        assert not any(inside(b, a) for b in blocks if b != a), "blocks must not nest"

    events: list[tuple[str, str]] = []
    inputs: dict[str, list[torch.Tensor]] = {b: [] for b in blocks}
    outputs: dict[str, list[torch.Tensor]] = {b: [] for b in blocks}
    handles = []
    for b in blocks:
        module = model.get_submodule(b)

        def pre(_m, inp, b=b):
            events.append(("start", b))
            assert len(inp) == 1 and isinstance(inp[0], torch.Tensor)
            inputs[b].append(inp[0])

        def post(_m, _inp, out, b=b):
            events.append(("end", b))
            assert isinstance(out, torch.Tensor)
            outputs[b].append(out)

        handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    layers = quant_layers(model)
    for name, layer in layers:
        hook = lambda _m, _i, name=name: events.append(("layer", name))
        handles.append(layer.register_forward_pre_hook(hook))
    logits = model(x)
    for h in handles:
        h.remove()

    # Each Conv2d/Linear runs exactly once, in registration order.
    assert [n for kind, n in events if kind == "layer"] == [n for n, _ in layers]
    # Each block runs once, in block_names() order, without overlapping another block.
    assert [e for e in events if e[0] != "layer"] == [
        (kind, b) for b in blocks for kind in ("start", "end")
    ]
    # Every layer call between a block's start and end belongs to that block; none elsewhere do.
    current = None
    for kind, name in events:
        if kind == "start":
            current = name
        elif kind == "end":
            current = None
        else:
            assert (current is not None and inside(name, current)) or not any(
                inside(name, b) for b in blocks
            ), f"{name} runs outside its block"
            if current is not None:
                assert inside(name, current), f"{name} runs inside block {current}"
    # Blocks chain: block i's input is block i-1's output.
    for prev, nxt in zip(blocks[:-1], blocks[1:], strict=True):
        assert inputs[nxt][0] is outputs[prev][0]
    # First registered layer is the stem (runs before every block), last is the classifier.
    first_name, _ = layers[0]
    last_name, last = layers[-1]
    assert events[0] == ("layer", first_name)
    assert events[-1] == ("layer", last_name)
    assert not any(inside(first_name, b) or inside(last_name, b) for b in blocks)
    assert isinstance(last, nn.Linear) and last.out_features == logits.shape[1]


def _replace_block(model: nn.Module, block: str, fn: Callable[[torch.Tensor], torch.Tensor]):
    """Forward hook that replaces ``block``'s output by ``fn(block input)``."""
    return model.get_submodule(block).register_forward_hook(lambda _m, inp, _out: fn(inp[0]))


@pytest.mark.parametrize("case", CASES)
def test_block_replacement(case: str) -> None:
    model, x = build(case)
    blocks = model.block_names()
    if case.startswith("mlp_deep"):
        assert blocks == ["blocks.0", "blocks.1"]
    if not blocks:
        pytest.skip("no blocks")
    with torch.no_grad():
        reference = model(x)
        # Relative tolerances: a torchvision MobileNet in eval mode with fresh BN statistics has
        # tiny logits (~1e-10).
        scale = reference.abs().max().item()
        for i, name in enumerate(blocks):
            block = model.get_submodule(name)
            # Identity replacement: the block's own computation (forward bypasses the hooks).
            handle = _replace_block(model, name, block.forward)
            try:
                assert (model(x) - reference).abs().max() <= 1e-5 * scale, name
            finally:
                handle.remove()
            if i % 3 and i != len(blocks) - 1:  # a perturbed copy for some blocks: keep it cheap
                continue
            other = copy.deepcopy(block)
            for p in other.parameters():
                p.add_(0.5 * torch.randn_like(p))
            handle = _replace_block(model, name, other)
            try:
                assert (model(x) - reference).abs().max() > 1e-3 * scale, name
            finally:
                handle.remove()
        assert torch.equal(model(x), reference)


@pytest.mark.slow  # 30 training steps
def test_small_cnn_learns_separable_problem() -> None:
    torch.manual_seed(0)
    n, size = 64, 28
    y = torch.arange(n) % 2
    x = 0.3 * torch.randn(n, 1, size, size)
    x[y == 1, :, : size // 2] += 1.0  # class 1: bright top half
    x[y == 0, :, size // 2 :] += 1.0  # class 0: bright bottom half
    model = SmallCNN(num_classes=2, in_channels=1, image_size=size, width=8)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5
    model.eval()
    assert (model(x).argmax(1) == y).float().mean() > 0.9


def test_make_activation() -> None:
    assert type(make_activation("relu")) is nn.ReLU
    tanh = make_activation("HardTanh")
    assert isinstance(tanh, nn.Hardtanh) and (tanh.min_val, tanh.max_val) == (-1.0, 1.0)
    assert make_activation("relu") is not make_activation("relu")
    assert not make_activation("relu").inplace
    with pytest.raises(QexpError, match="relu, hardtanh"):
        make_activation("gelu")


@pytest.mark.parametrize(
    "cls", [SmallCNN, MLP, ResNet20, VGGSmall, ResNet18, MobileNetV2, MobileNetV3Small]
)
def test_hardtanh_option_replaces_every_relu(cls: type[nn.Module]) -> None:
    model = cls(num_classes=10, in_channels=3, image_size=32, activation="hardtanh")
    kinds = {type(m) for m in model.modules()}
    assert nn.Hardtanh in kinds and not kinds & {nn.ReLU, nn.ReLU6, nn.Hardswish}
    default = {type(m) for m in cls(num_classes=10, in_channels=3, image_size=32).modules()}
    assert nn.Hardtanh not in default


def test_bad_options_raise_clear_errors() -> None:
    with pytest.raises(QexpError, match="depth"):
        ResNet20(num_classes=10, in_channels=3, image_size=32, depth=21)
    with pytest.raises(QexpError, match="image_size"):
        VGGSmall(num_classes=10, in_channels=3, image_size=4)
    with pytest.raises(QexpError, match="width"):
        SmallCNN(num_classes=10, in_channels=1, image_size=28, width=0)
    with pytest.raises(QexpError, match="activation"):
        MLP(num_classes=10, in_channels=1, image_size=8, activation="swish")


def test_mlp_edge_cases() -> None:
    one = MLP(num_classes=3, in_channels=1, image_size=8, hidden=[16])
    assert one.block_names() == []
    linear = MLP(num_classes=3, in_channels=1, image_size=8, hidden=[])
    assert [type(m) for _, m in quant_layers(linear)] == [nn.Linear]
    assert linear(torch.randn(2, 1, 8, 8)).shape == (2, 3)


def test_resnet20_depth_and_shortcuts() -> None:
    model = ResNet20(num_classes=10, in_channels=3, image_size=32, depth=32)
    assert len(model.block_names()) == 15
    convs = [m for _, m in quant_layers(model) if isinstance(m, nn.Conv2d)]
    assert len(convs) == 1 + 2 * 15 + 2  # stem, two per block, two 1x1 projection shortcuts
    default = ResNet20(num_classes=10, in_channels=3, image_size=32)
    assert sum(p.numel() for p in default.parameters()) < 300_000  # ~0.27M parameters


def test_vgg_small_flattened_size() -> None:
    m32 = VGGSmall(num_classes=10, in_channels=3, image_size=32)
    assert quant_layers(m32)[-1][1].in_features == 512 * 4 * 4
    m28 = VGGSmall(num_classes=10, in_channels=1, image_size=28, fc_hidden=1024)
    linears = [m for _, m in quant_layers(m28) if isinstance(m, nn.Linear)]
    assert [(lin.in_features, lin.out_features) for lin in linears] == [
        (512 * 3 * 3, 1024),
        (1024, 1024),
        (1024, 10),
    ]


@pytest.mark.parametrize("path", sorted(CONF_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_yaml_instantiates_with_commented_options(path: Path) -> None:
    cfg = OmegaConf.load(path)
    assert cfg.name == path.stem and "_target_" in cfg
    for line in path.read_text().splitlines():
        key = line.split(":", 1)[0]
        if line and not line.startswith("#") and key not in ("_target_", "name"):
            assert "#" in line, f"{path.name}: option without a comment: {line}"
    if cfg.name == "char_gpt":  # tokens in, the logits of every position out
        model = instantiate(cfg, num_classes=10, in_channels=1, image_size=16).eval()
        assert model(torch.randint(0, 10, (2, 16))).shape == (2 * 16, 10)
        assert all(isinstance(b, str) for b in model.block_names())
        return
    channels, size = (1, 28) if cfg.name in ("small_cnn", "mlp", "vit_tiny") else (3, 32)
    model = instantiate(cfg, num_classes=10, in_channels=channels, image_size=size).eval()
    assert model(torch.randn(2, channels, size, size)).shape == (2, 10)
    assert all(isinstance(b, str) for b in model.block_names())


def test_pretrained_loads_and_adapts_torchvision_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(1)
    source = torchvision.models.resnet18().state_dict()  # stands in for the ImageNet weights
    monkeypatch.setattr(
        torchvision.models.WeightsEnum, "get_state_dict", lambda self, **kw: dict(source)
    )
    model = ResNet18(num_classes=10, in_channels=1, image_size=32, pretrained=True)
    own = model.state_dict()
    assert torch.equal(own["layer3.1.conv2.weight"], source["layer3.1.conv2.weight"])
    assert torch.allclose(own["conv1.weight"], source["conv1.weight"].sum(1, keepdim=True))
    assert own["fc.weight"].shape == (10, 512)

    mobile = torchvision.models.mobilenet_v2().state_dict()
    monkeypatch.setattr(
        torchvision.models.WeightsEnum, "get_state_dict", lambda self, **kw: dict(mobile)
    )
    model = MobileNetV2(num_classes=10, in_channels=3, image_size=32, pretrained=True)
    key = "features.5.conv.1.0.weight"
    assert torch.equal(model.state_dict()[key], mobile[key])
    with pytest.raises(QexpError, match="width"):
        MobileNetV2(num_classes=10, in_channels=3, image_size=32, width_mult=0.5, pretrained=True)


def test_pretrained_without_weights_raises_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(self, **kw):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torchvision.models.WeightsEnum, "get_state_dict", offline)
    with pytest.raises(QexpError, match="pretrained=false"):
        ResNet18(num_classes=10, in_channels=3, image_size=32, pretrained=True)
