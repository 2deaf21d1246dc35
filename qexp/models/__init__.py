"""Model zoo: every model is built by Hydra from conf/model/*.yaml with ``num_classes``,
``in_channels`` and ``image_size`` supplied by the trainer, and exposes ``block_names()``."""

from qexp.models.layers import make_activation
from qexp.models.mlp import MLP
from qexp.models.resnet_cifar import ResNet20
from qexp.models.small_cnn import SmallCNN
from qexp.models.torchvision_models import MobileNetV2, MobileNetV3Small, ResNet18
from qexp.models.vgg_small import VGGSmall

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
