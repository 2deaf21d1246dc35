"""Builders of a run's components from their config nodes (Hydra ``_target_`` nodes).

Each builder takes the node it needs, never the whole composed config: reading the composed
config is the composition root's job (qexp.train.run).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import hydra.utils
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from qexp.data.base import DataInfo, DataModule
from qexp.errors import QexpError
from qexp.estimators.base import Estimator, EstimatorContext
from qexp.estimators.model import QuantModel
from qexp.quant.base import Quantizer
from qexp.quant.overrides import layer_quantizer_spec
from qexp.quant.wrap import QuantizerFactory, attach_estimator
from qexp.train.checkpoint import checkpoint_file, load_checkpoint

log = logging.getLogger("qexp")


def instantiate(node: Any, key: str, **kwargs: Any) -> Any:
    """Instantiate a ``_target_`` node (its ``name`` key is a label, not an argument).

    Constructor errors become QexpError naming ``key``, so a bad option value reads as a
    one-line message rather than a traceback.
    """
    spec = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node
    spec = _drop_labels(dict(spec))
    try:
        return hydra.utils.instantiate(spec, **kwargs, _convert_="all")
    except QexpError:
        raise
    except Exception as exc:
        cause = exc.__cause__ or exc
        if isinstance(cause, QexpError):
            raise cause from None
        msg = str(cause).strip().splitlines()[-1] if str(cause).strip() else type(cause).__name__
        raise QexpError(f"{key}: {msg}") from None


def _drop_labels(spec: Any) -> Any:
    """Remove ``name`` labels from ``_target_`` nodes at any depth (they are not arguments)."""
    if isinstance(spec, dict):
        out = {k: _drop_labels(v) for k, v in spec.items()}
        if "_target_" in out:
            out.pop("name", None)
        return out
    if isinstance(spec, list):
        return [_drop_labels(v) for v in spec]
    return spec


def quantizer_factory(node: Any, key: str) -> QuantizerFactory:
    """A function (role, bits) -> Quantizer, or None for 32 bits, from a quantizer node.

    ``node`` is either a quantizer group node with ``weight``/``activation`` entries or a single
    ``_target_`` node used for both roles.
    """

    def make(role: str, bits: int, options: Any = None) -> Quantizer | None:
        if bits >= 32:
            return None
        # a per-layer rule's quantizer options (qexp/quant/overrides.py) change this layer's
        spec = layer_quantizer_spec(node, role, options) if options else node.get(role, node)
        return instantiate(spec, f"{key}.{role}", bits=bits, role=role)

    return make


def resolve_device(name: str) -> torch.device:
    """``auto`` picks cuda, then mps, then cpu; explicit names must be available."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise QexpError(
            f"trainer.device={name} but no CUDA GPU is visible: use trainer.device=auto or cpu"
        )
    return torch.device(name)


def build_data(node: Any) -> DataModule:
    """The data set of a ``dataset`` node."""
    return instantiate(node, "dataset")


def build_net(node: Any, info: DataInfo) -> nn.Module:
    """The plain float network of a ``model`` node, sized for the data set."""
    try:
        return instantiate(
            node,
            "model",
            num_classes=info.num_classes,
            in_channels=info.in_channels,
            image_size=info.image_size,
        )
    except QexpError as exc:
        if "unexpected keyword argument" not in str(exc):
            raise
        raise QexpError(
            f"{exc}: qexp builds every model with num_classes, in_channels and image_size (from "
            "the data set); give the model's __init__ those arguments (or **kwargs)"
        ) from None


def build_estimator(node: Any) -> Estimator:
    """The estimator of an ``estimator`` node."""
    estimator = instantiate(node, "estimator")
    if not isinstance(estimator, Estimator):
        raise QexpError(
            "estimator._target_ must build a qexp.estimators.Estimator, "
            f"got {type(estimator).__name__}"
        )
    return estimator


def wire_estimator(
    model: QuantModel,
    device: torch.device,
    total_steps: int,
    run_dir: Path | None = None,
    partner: nn.Module | None = None,
) -> QuantModel:
    """Point the body layers of ``model`` at its estimator and let the estimator see the model
    (and the frozen ``partner`` when it needs one); call after initial weights are loaded."""
    attach_estimator(model.net, model.estimator)
    ctx = EstimatorContext(total_steps=total_steps, device=device, run_dir=run_dir, partner=partner)
    model.estimator.attach(model, ctx)
    return model.to(device)


def load_initial_weights(model: QuantModel, source: Path, given: str | None = None) -> None:
    """Copy the network weights of another run (e.g. full precision) into ``model``.

    Only tensors whose names and shapes match are copied; quantizer and estimator state of
    this run are kept, so any estimator can start from a full-precision checkpoint. ``given``
    is the option's value as written (for messages).
    """
    source = Path(source)
    given = given or str(source)
    ckpt = load_checkpoint(checkpoint_file(source, "init_from"))
    state = ckpt.get("model", ckpt)
    own = model.state_dict()
    copied = {
        k: v
        for k, v in state.items()
        if k.startswith("net.")
        and k in own
        and own[k].shape == v.shape
        and ".w_quant." not in k
        and ".a_quant." not in k
    }
    if not copied:
        raise QexpError(f"init_from={given}: no matching weights (is it the same model?)")
    model.load_state_dict(copied, strict=False)
    log.info("initialised %d tensors from %s", len(copied), source)
