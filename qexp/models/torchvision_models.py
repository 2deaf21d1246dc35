"""torchvision ImageNet architectures (ResNet-18, MobileNetV2, MobileNetV3-Small) for qexp.

Each class subclasses the torchvision model, so the module tree and state_dict keys are
torchvision's own (``conv1``, ``layer1.0``, ``features.3``...), adapted to qexp's interface:
``num_classes`` sets the classifier, ``in_channels`` != 3 replaces the first conv, and
``block_names()`` lists the residual / inverted-residual blocks.
"""

from __future__ import annotations

from torch import nn
from torchvision.models import (
    MobileNet_V2_Weights,
    MobileNet_V3_Small_Weights,
    ResNet18_Weights,
    WeightsEnum,
)
from torchvision.models import MobileNetV2 as _TVMobileNetV2
from torchvision.models import MobileNetV3 as _TVMobileNetV3
from torchvision.models.mobilenetv3 import _mobilenet_v3_conf
from torchvision.models.resnet import BasicBlock
from torchvision.models.resnet import ResNet as _TVResNet

from qexp.errors import QexpError
from qexp.models.layers import make_activation


def _replace_first_conv(conv: nn.Conv2d, in_channels: int) -> nn.Conv2d:
    """A fresh Conv2d like ``conv`` but reading ``in_channels`` channels."""
    return nn.Conv2d(
        in_channels,
        conv.out_channels,
        conv.kernel_size,  # type: ignore[arg-type]
        stride=conv.stride,  # type: ignore[arg-type]
        padding=conv.padding,  # type: ignore[arg-type]
        bias=conv.bias is not None,
    )


def _replace_activations(
    module: nn.Module, kinds: tuple[type[nn.Module], ...], activation: str
) -> None:
    """Swap every module of a type in ``kinds`` below ``module`` for
    ``make_activation(activation)`` (a fresh, not in-place module each)."""
    for child_name, child in module.named_children():
        if isinstance(child, kinds):
            setattr(module, child_name, make_activation(activation))
        else:
            _replace_activations(child, kinds, activation)


def _mobilenet_activation(model: nn.Module, activation: str) -> None:
    """Apply the activation option to a torchvision MobileNet.

    "relu" keeps torchvision's activations (ReLU6, or ReLU + Hardswish); "hardtanh" replaces all
    of them (SE-block internals and classifier included), so every quantized layer of a
    sign-binarized net sees a signed input.
    """
    make_activation(activation)  # validates the name
    if str(activation).lower() != "relu":
        _replace_activations(model, (nn.ReLU, nn.ReLU6, nn.Hardswish), activation)


def _load_pretrained(
    model: nn.Module, weights: WeightsEnum, first_conv: str, classifier: str
) -> None:
    """Load torchvision's ImageNet weights into ``model``.

    torchvision takes them from the torch hub cache ($TORCH_HOME, default ~/.cache/torch) and
    downloads them there when missing. The classifier (``classifier``.*) is kept freshly
    initialised when num_classes != 1000; the first conv (``first_conv``.weight) is averaged
    over the RGB channels when in_channels != 3, and left fresh if its kernel differs.
    """
    try:
        state = weights.get_state_dict(progress=True, check_hash=True)
    except (OSError, RuntimeError, ValueError) as exc:
        raise QexpError(
            f"could not load torchvision's pretrained weights {weights} ({exc}); they are "
            "downloaded once into the torch hub cache ($TORCH_HOME, default ~/.cache/torch): "
            "run once with internet access, or set model.pretrained=false"
        ) from exc
    own = model.state_dict()
    first_weight = f"{first_conv}.weight"
    for key in list(state):
        if key not in own:
            raise QexpError(f"pretrained weights {weights} do not fit this model (key {key})")
        if state[key].shape == own[key].shape:
            continue
        src, dst = state[key], own[key]
        if key == first_weight and src.shape[0] == dst.shape[0] and src.shape[2:] == dst.shape[2:]:
            state[key] = src.mean(1, keepdim=True).repeat(1, dst.shape[1], 1, 1) * (
                src.shape[1] / dst.shape[1]
            )
        elif key == first_weight or key.startswith(f"{classifier}."):
            del state[key]
        else:
            raise QexpError(
                f"pretrained weights {weights} do not fit this model: {key} has shape "
                f"{tuple(src.shape)}, the model {tuple(dst.shape)} (use the default width, "
                "or model.pretrained=false)"
            )
    model.load_state_dict(state, strict=False)


def _adapt_mobilenet_stem(features: nn.Sequential, in_channels: int) -> None:
    """Make a torchvision MobileNet's first conv (features[0][0]) read ``in_channels``."""
    if in_channels != 3:
        stem = features[0]
        stem[0] = _replace_first_conv(stem[0], in_channels)  # type: ignore[index,arg-type]


def _mobilenet_block_names(features: nn.Sequential) -> list[str]:
    """features[0] is the stem and features[-1] the last 1x1 conv (part of the head); every
    module in between is an InvertedResidual block."""
    return [f"features.{i}" for i in range(1, len(features) - 1)]


class ResNet18(_TVResNet):
    """torchvision ResNet-18 with ``num_classes`` outputs and ``in_channels`` inputs.

    Blocks: the eight BasicBlocks ``layer1.0`` ... ``layer4.1``. ``small_input=True`` swaps the
    ImageNet stem (7x7 stride-2 conv + max pool) for a 3x3 stride-1 conv, the usual CIFAR
    adaptation. ``activation="hardtanh"`` replaces every ReLU. ``pretrained=True`` loads
    torchvision's ImageNet weights (downloaded into the torch hub cache if missing).
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int,
        image_size: int,
        pretrained: bool = False,
        small_input: bool = False,
        activation: str = "relu",
        name: str | None = None,
    ) -> None:
        super().__init__(BasicBlock, [2, 2, 2, 2], num_classes=num_classes)
        if small_input:
            self.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
            self.maxpool = nn.Identity()  # type: ignore[assignment]
        elif in_channels != 3:
            self.conv1 = _replace_first_conv(self.conv1, in_channels)
        _replace_activations(self, (nn.ReLU,), activation)
        if pretrained:
            _load_pretrained(self, ResNet18_Weights.DEFAULT, "conv1", "fc")

    def block_names(self) -> list[str]:
        """Dotted names of the BasicBlocks, in forward order."""
        return [f"layer{s}.{i}" for s in (1, 2, 3, 4) for i in range(2)]


class MobileNetV2(_TVMobileNetV2):
    """torchvision MobileNetV2 with ``num_classes`` outputs and ``in_channels`` inputs.

    Blocks: the 17 InvertedResiduals ``features.1`` ... ``features.17``; the final 1x1 conv,
    pooling and classifier form the head. ``activation="hardtanh"`` replaces every ReLU6;
    ``pretrained=True`` (width_mult 1.0 only) loads torchvision's ImageNet weights.
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int,
        image_size: int,
        width_mult: float = 1.0,
        dropout: float = 0.2,
        pretrained: bool = False,
        activation: str = "relu",
        name: str | None = None,
    ) -> None:
        super().__init__(
            num_classes=num_classes, width_mult=float(width_mult), dropout=float(dropout)
        )
        _adapt_mobilenet_stem(self.features, in_channels)
        _mobilenet_activation(self, activation)
        if pretrained:
            _load_pretrained(self, MobileNet_V2_Weights.DEFAULT, "features.0.0", "classifier.1")

    def block_names(self) -> list[str]:
        """Dotted names of the InvertedResidual blocks, in forward order."""
        return _mobilenet_block_names(self.features)


class MobileNetV3Small(_TVMobileNetV3):
    """torchvision MobileNetV3-Small with ``num_classes`` outputs and ``in_channels`` inputs.

    Blocks: the 11 InvertedResiduals ``features.1`` ... ``features.11``; the final 1x1 conv,
    pooling and the two-layer classifier form the head. ``activation="hardtanh"`` replaces every
    ReLU and Hardswish; ``pretrained=True`` (width_mult 1.0 only) loads torchvision's ImageNet
    weights.
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int,
        image_size: int,
        width_mult: float = 1.0,
        dropout: float = 0.2,
        pretrained: bool = False,
        activation: str = "relu",
        name: str | None = None,
    ) -> None:
        setting, last_channel = _mobilenet_v3_conf(
            "mobilenet_v3_small", width_mult=float(width_mult)
        )
        super().__init__(setting, last_channel, num_classes=num_classes, dropout=float(dropout))
        _adapt_mobilenet_stem(self.features, in_channels)
        _mobilenet_activation(self, activation)
        if pretrained:
            _load_pretrained(
                self, MobileNet_V3_Small_Weights.DEFAULT, "features.0.0", "classifier.3"
            )

    def block_names(self) -> list[str]:
        """Dotted names of the InvertedResidual blocks, in forward order."""
        return _mobilenet_block_names(self.features)
