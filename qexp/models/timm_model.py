"""Models from timm (PyTorch Image Models), when it is installed: ``pip install qexp[timm]``.

A model config for any timm architecture (put it under ``--config-dir DIR/model/``)::

    _target_: qexp.models.timm_model.timm_model
    name: timm_resnet10t
    model_name: resnet10t      # any name timm.list_models() knows
    # further keys go to timm.create_model (e.g. drop_rate: 0.1, img_size: 32 for a ViT)

qexp quantizes the model's nn.Conv2d and nn.Linear layers. Some timm architectures use their
own conv or linear classes (e.g. StdConv2d, Conv2dSame): qexp stops with one line naming such a
layer; keep it in float with ``layers.overrides`` or pick another architecture.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from qexp.errors import QexpError


def timm_model(
    num_classes: int,
    in_channels: int,
    image_size: int,
    model_name: str,
    pretrained: bool = False,
    **kwargs: Any,
) -> nn.Module:
    """``timm.create_model(model_name, ...)`` sized for the data set (classes, channels).

    ``image_size`` is not passed on (most timm CNNs take any size); give ``img_size`` in the
    config for architectures that need it.
    """
    try:
        import timm
    except ImportError:
        raise QexpError(
            f"model.model_name={model_name}: timm is not installed; pip install 'qexp[timm]' "
            "(or pip install timm)"
        ) from None
    if model_name not in timm.list_models(model_name):
        close = timm.list_models(f"*{model_name}*")[:5]
        hint = f" (similar: {', '.join(close)})" if close else ""
        raise QexpError(f"model.model_name={model_name!r} is not a timm model{hint}")
    return timm.create_model(
        model_name,
        pretrained=pretrained,
        num_classes=num_classes,
        in_chans=in_channels,
        **kwargs,
    )
