"""Typed schemas of the run config, registered in Hydra's ConfigStore.

The primary config (conf/config.yaml) lists ``qexp_schema`` first in its defaults, so every
value composed on top of it is type-checked by OmegaConf (``bits=abc`` fails at compose time)
and unknown top-level or trainer keys are rejected. Range checks and the options of each
group's ``_target_`` are checked by qexp.config.validate before any work starts.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from qexp.config.resolvers import register_resolvers
from qexp.spec import BudgetSpec, PartnerSpec, TrainerSettings

# OmegaConf needs typing.Optional (not "X | None") in structured configs.
# ruff: noqa: UP045


def _unfrozen(frozen: type) -> type:
    """A mutable copy of a frozen dataclass: Hydra must be able to apply overrides to the
    node, which OmegaConf forbids on a frozen dataclass's config."""
    fields = [(f.name, f.type, field(default=f.default)) for f in dataclasses.fields(frozen)]
    name = frozen.__name__.replace("Settings", "Config").replace("Spec", "Config")
    return dataclasses.make_dataclass(name, fields)


#: the ``trainer`` node: the fields of :class:`qexp.spec.TrainerSettings`
TrainerConfig = _unfrozen(TrainerSettings)
#: the ``budget`` node (learned bit widths under a memory budget): :class:`qexp.spec.BudgetSpec`
BudgetConfig = _unfrozen(BudgetSpec)
#: the ``partner`` node (block replacement's float partner): :class:`qexp.spec.PartnerSpec`
PartnerConfig = _unfrozen(PartnerSpec)


@dataclass
class LayersConfig:
    """Treatment of the first and last quantizable layers (logged with every run)."""

    first_bits: Optional[int] = 8
    last_bits: Optional[int] = 8
    edge_quantizer: Any = field(
        default_factory=lambda: {"_target_": "qexp.quant.uniform.UniformQuantizer"}
    )
    overrides: Any = field(default_factory=list)  # per-layer rules (qexp/quant/overrides.py)
    # Transformers. null keeps them float, the papers' form (BitNet b1.58 and ParetoQ quantize
    # the Linear layers only); an int quantizes them, qexp's own option:
    matmul_bits: Optional[int] = None  # both inputs of q k^T and softmax v, per-token absmax
    embed_bits: Optional[int] = None  # nn.Embedding tables, one absmax scale per row (edge)


@dataclass
class QexpConfig:
    """The whole run: five component groups plus run-level settings."""

    model: Any = MISSING
    dataset: Any = MISSING
    quantizer: Any = MISSING
    estimator: Any = MISSING
    schedule: Any = MISSING
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    layers: LayersConfig = field(default_factory=LayersConfig)
    budget: BudgetConfig = field(default_factory=BudgetConfig)  # type: ignore[valid-type]
    partner: PartnerConfig = field(default_factory=PartnerConfig)  # type: ignore[valid-type]
    seed: int = 0
    # An int, or the float 1.58 (ternary): OmegaConf has no Union of int and float, and a float
    # field would turn every int width into a float (4 -> 4.0) and change each run's config
    # fingerprint; so Any, checked by qexp.config.validate against qexp.bitwidth.
    bits: Any = 4
    w_bits: Any = "${bits}"
    a_bits: Any = "${bits}"
    resume: bool = False
    init_from: Optional[str] = None
    tag: Optional[str] = None


def register_schemas() -> None:
    """Register the schemas with Hydra and the config files' resolvers with OmegaConf
    (idempotent); every entry point that composes or loads a run config calls it first."""
    register_resolvers()
    ConfigStore.instance().store(name="qexp_schema", node=QexpConfig)
