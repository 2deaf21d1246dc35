"""Typed specs of a run: what the composition root reads out of the composed config, once.

Frozen dataclasses with no Hydra, OmegaConf or torch: the composition root (qexp/train/run.py)
builds them from the config, and everything below it reads only these. The Hydra schema
(qexp/config/schema.py) derives its ``trainer`` node from :class:`TrainerSettings`, so the
trainer's options, their types and defaults are written once.
"""

# No `from __future__ import annotations`: the schema hands these annotations to OmegaConf,
# which needs real types (and typing.Optional rather than "X | None").
# ruff: noqa: UP045

from dataclasses import dataclass, replace
from typing import Optional

#: values of ``trainer.compile`` (qexp/train/compile.py)
COMPILE_MODES = ("off", "on", "auto")
OPTIMIZERS = ("sgd", "adam", "adamw")
PROGRESS_MODES = ("auto", "bar", "log", "none")
AMP_DTYPES = ("bfloat16", "float16")


@dataclass(frozen=True)
class TrainerSettings:
    """Optimisation and hardware settings shared by every run."""

    epochs: int = 3
    batch_size: int = 128
    eval_batch_size: int = 1000
    lr: float = 2e-3
    optimizer: str = "adam"
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0
    quantizer_lr: Optional[float] = None
    grad_clip: Optional[float] = None
    device: str = "auto"
    amp: bool = False
    amp_dtype: str = "bfloat16"
    threads: Optional[int] = None
    log_every: int = 50
    progress: str = "auto"
    histograms: bool = True
    patience: Optional[int] = None
    compile: str = "auto"


@dataclass(frozen=True)
class BudgetSpec:
    """A memory budget for learned bit widths (Uhlich et al.): sizes in KB or average bits.

    The loss gets ``lambda_w relu(S_w - S_w0)^2 + lambda_a relu(S_a - S_a0)^2`` with sizes at
    the current bits; only epochs that meet the budget can be the reported model. ``margin``
    makes the penalty aim that fraction below each budget (qexp's choice: the quadratic penalty
    fades near the budget and stalls a hair above it; 0 is the paper's form).
    """

    weight_kb: Optional[float] = None  # S_w0: every quantized layer's weights, edges at their bits
    weight_avg_bits: Optional[float] = None  # or S_w0 as average bits per weight
    act_kb: Optional[float] = None  # S_a0: layer inputs (values per sample) at their bits
    act_avg_bits: Optional[float] = None  # or S_a0 as average bits per activation value
    act_mode: str = "max"  # max: the largest layer input (the paper) | sum: all layer inputs
    lambda_w: float = 0.1
    lambda_a: float = 0.1
    margin: float = 0.05

    @property
    def active(self) -> bool:
        """Whether any budget is set."""
        sizes = (self.weight_kb, self.weight_avg_bits, self.act_kb, self.act_avg_bits)
        return any(v is not None for v in sizes)

    def penalty_options(self) -> dict:
        """The options of qexp.quant.budget.BudgetPenalty."""
        return {
            "weight_budget_kb": self.weight_kb,
            "weight_avg_bits": self.weight_avg_bits,
            "act_budget_kb": self.act_kb,
            "act_avg_bits": self.act_avg_bits,
            "act_budget_mode": self.act_mode,
            "lambda_w": self.lambda_w,
            "lambda_a": self.lambda_a,
            "budget_margin": self.margin,
        }


@dataclass(frozen=True)
class PartnerSpec:
    """The frozen full-precision partner of estimators that need one (block replacement).

    ``source``: a checkpoint file or run dir to use as it is; None: qexp trains it once with the
    run's settings at full precision and caches it in ``$QEXP_CACHE/partners/<key>``.
    ``epochs``: epochs of that cached training (None: the run's ``trainer.epochs``).
    """

    source: Optional[str] = None
    epochs: Optional[int] = None


@dataclass(frozen=True)
class LayersSpec:
    """The first and last quantizable layers: their bits (None: like the body) and the
    quantizer they use (a ``_target_`` node); then the per-layer override rules (plain
    dicts, qexp/quant/overrides.py)."""

    first_bits: Optional[int]
    last_bits: Optional[int]
    edge_quantizer: dict
    overrides: tuple = ()
    matmul_bits: Optional[int] = None  # activation-activation products (None: float)
    embed_bits: Optional[int] = None  # embedding tables (None: float)


@dataclass(frozen=True)
class RunSpec:
    """One run, as the composition root read it from the composed config.

    The component nodes (``model``, ``dataset``, ``quantizer``, ``estimator``, ``lr_schedule``)
    are plain ``_target_`` dicts that the root's builders instantiate; ``config`` is the whole
    resolved config (written beside the run and into its record); ``identity`` the fields
    that head its ``metrics.json``; ``fingerprint`` the hash of every setting that changes a
    result (qexp.record.config_fingerprint).
    """

    config: dict
    fingerprint: str
    identity: dict
    seed: int
    w_bits: float  # an int, or 1.58 (ternary: qexp.bitwidth)
    a_bits: float
    model: dict
    dataset: dict
    quantizer: dict
    estimator: dict
    lr_schedule: dict
    layers: LayersSpec
    budget: BudgetSpec
    trainer: TrainerSettings
    partner: PartnerSpec
    init_from: Optional[str] = None
    resume: bool = False

    def with_runtime(self, **trainer: object) -> "RunSpec":
        """This run with other result-free settings (resume, and trainer device / threads /
        progress / compile): same fingerprint, same numbers."""
        resume = bool(trainer.pop("resume", self.resume))
        return replace(self, resume=resume, trainer=replace(self.trainer, **trainer))
