"""Model zoo: every model is built by Hydra from conf/model/*.yaml with ``num_classes``,
``in_channels`` and ``image_size`` supplied by the trainer, and exposes ``block_names()``."""

from typing import Any

from qexp.models.layers import make_activation
from qexp.models.mlp import MLP
from qexp.models.resnet_cifar import ResNet20
from qexp.models.small_cnn import SmallCNN
from qexp.models.vgg_small import VGGSmall

#: models built on torchvision, imported on first use: importing torchvision costs about
#: 160 MB of resident memory that runs of the other models never need
_TORCHVISION_MODELS = ("MobileNetV2", "MobileNetV3Small", "ResNet18")

__all__ = [
    "MLP",
    "MobileNetV2",
    "MobileNetV3Small",
    "ResNet18",
    "ResNet20",
    "SmallCNN",
    "VGGSmall",
    "make_activation",
]


def __getattr__(name: str) -> Any:
    if name in _TORCHVISION_MODELS:
        from qexp.models import torchvision_models

        return getattr(torchvision_models, name)
    raise AttributeError(f"module 'qexp.models' has no attribute {name!r}")
