"""Checks a `qexp train` command line before Hydra runs it.

Composes the config of every job the command describes (each point of a sweep) with Hydra's
compose API and validates it, so that a typo'd key, a bad value or an unknown group option
ends in one clear line instead of a traceback, before any job starts.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from qexp.bitwidth import as_bits
from qexp.config.launcher import check_launcher
from qexp.config.validate import validate_config
from qexp.errors import QexpError
from qexp.quant.base import Quantizer

#: Hydra flags after which no job runs (help, printing the config, shell completion...).
_NO_JOB_FLAGS = (
    "help",
    "hydra_help",
    "version",
    "cfg",
    "info",
    "shell_completion",
    "experimental_rerun",
)
MAX_JOBS_CHECKED = 512


def _known_keys(cfg: DictConfig, prefix: str = "") -> list[str]:
    keys = []
    for k, v in cfg.items_ex(resolve=False) if hasattr(cfg, "items_ex") else cfg.items():
        full = f"{prefix}{k}"
        keys.append(full)
        if isinstance(v, DictConfig):
            keys += _known_keys(v, f"{full}.")
    return keys


def _one_line(exc: Exception, override_keys: list[str], base: DictConfig | None) -> str:
    """Turn a Hydra/OmegaConf composition error into one actionable line."""
    from hydra.errors import MissingConfigException

    text = str(exc).strip()
    cause = exc.__cause__
    if isinstance(exc, MissingConfigException):
        m = re.search(r"Could not find '([^']+)/([^']+)'", text)
        options = sorted(set(getattr(exc, "options", None) or []))
        if m:
            group, name = m.group(1), m.group(2)
            choice = " | ".join(options) if options else "see conf/" + group
            return (
                f"{group}={name} is not an option of '{group}': use one of {choice} "
                f"(or add {group}/{name}.yaml under --config-dir)"
            )
        return text.splitlines()[0]
    m = re.search(r"Could not override '([^']+)'", text)
    if m and m.group(1).startswith("hydra.launcher."):
        return (
            f"{m.group(1)} is not an option of the launcher in use: check the spelling, or pick "
            "the launcher first (hydra/launcher=local | slurm | joblib | submitit_local | "
            "submitit_slurm)"
        )
    if m:
        key = m.group(1)
        hint = ""
        if base is not None:
            close = difflib.get_close_matches(key, _known_keys(base), n=3)
            if close:
                hint = f" (did you mean {' or '.join(close)}?)"
        return (
            f"{key} is not a config key{hint}: check the spelling, or add a new key with +{key}=..."
        )
    m = re.search(r"Error merging override (\S+)", text)
    if m and cause is not None:
        detail = str(cause).strip().splitlines()[0]
        key = m.group(1).split("=")[0]
        return f"{m.group(1)} is not allowed: {detail} (key '{key}')"
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return "; ".join(lines[:2]) if lines else type(exc).__name__


def _jobs(overrides: list[str], multirun: bool, extra: list[str]) -> list[list[str]]:
    """The override lists of every job (the points of a sweep when ``multirun``).

    A preset's ``hydra.sweeper.params`` (e.g. ``+experiment=estimators_vs_bits``) join the
    command line's sweeps, which win for the same key, as in Hydra's basic sweeper.
    """
    if not multirun:
        return [overrides]
    from hydra import compose
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    parsed = parser.parse_overrides(overrides)
    fixed = [o.input_line for o in parsed if not o.is_sweep_override()]
    try:
        hydra_cfg = compose("config", overrides=fixed + extra, return_hydra_config=True)
        params = dict(hydra_cfg.hydra.sweeper.get("params") or {})
    except Exception:
        params = {}  # composition errors are reported per job below
    given = {o.key_or_group for o in parsed}
    preset = [f"{k}={v}" for k, v in params.items() if k not in given]
    jobs: list[list[str]] = []
    for batch in BasicSweeper.split_arguments(parser.parse_overrides(preset + overrides), None):
        jobs += [list(job) for job in batch]
        if len(jobs) >= MAX_JOBS_CHECKED:
            break
    return jobs or [overrides]


def check_command_line(argv: list[str]) -> None:
    """Raise QexpError if any job of ``qexp train ARGV`` has an invalid config."""
    from hydra import compose, initialize_config_module
    from hydra._internal.utils import get_args_parser
    from hydra.core.global_hydra import GlobalHydra

    try:
        args = get_args_parser().parse_args(argv)
    except SystemExit:
        return  # argparse already printed its usage message; let Hydra handle the rest
    if getattr(args, "cfg", None) and not args.multirun:
        _show_plan_of(args)  # `qexp train --cfg job`: the per-layer table too
    if any(getattr(args, flag, None) for flag in _NO_JOB_FLAGS):
        return
    if args.config_name or args.config_path:
        return  # a different primary config: Hydra reports its own errors
    overrides = [o for o in args.overrides if not o.lstrip("+~").startswith("hydra")]
    extra: list[str] = []
    if args.config_dir:
        extra.append(f"hydra.searchpath=[file://{Path(args.config_dir).resolve()}]")
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module(config_module="qexp.conf", version_base=None):
            base = None
            try:
                base = compose(config_name="config", overrides=extra)
            except Exception:
                base = None
            check_hydra_options(args.overrides, extra, base)
            shown = False
            for job in _jobs(overrides, args.multirun, extra):
                try:
                    cfg = compose(config_name="config", overrides=job + extra)
                except QexpError:
                    raise
                except Exception as exc:
                    raise QexpError(_one_line(exc, job, base)) from None
                validate_config(cfg)
                dry_build(cfg)
                if has_layer_plan(cfg):
                    check_layer_plan(cfg, show=not shown)
                    shown = True
    finally:
        GlobalHydra.instance().clear()


def _show_plan_of(args: Any) -> None:
    """Print the per-layer table of a single run's config when it has override rules (errors
    are left to Hydra's own printing of the config)."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    extra = []
    if args.config_dir:
        extra.append(f"hydra.searchpath=[file://{Path(args.config_dir).resolve()}]")
    overrides = [o for o in args.overrides if not o.lstrip("+~").startswith("hydra")]
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module(config_module="qexp.conf", version_base=None):
            cfg = compose(config_name="config", overrides=overrides + extra)
            if has_layer_plan(cfg):
                check_layer_plan(cfg, show=True)
    except Exception as exc:  # noqa: BLE001 - Hydra prints the config (or its error) next
        print(f"qexp: per-layer table not shown: {str(exc).splitlines()[0]}")
    finally:
        GlobalHydra.instance().clear()


def check_hydra_options(overrides: list[str], extra: list[str], base: DictConfig | None) -> None:
    """Compose the Hydra config once (sweeps left out) and check the launcher's values, so a
    bad launcher option ends in one line before any job starts."""
    from hydra import compose
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception:
        return  # a malformed override: reported with the jobs' checks
    fixed = [o.input_line for o in parsed if not o.is_sweep_override()]
    try:
        cfg = compose(config_name="config", overrides=fixed + extra, return_hydra_config=True)
    except Exception as exc:
        raise QexpError(_one_line(exc, fixed, base)) from None
    check_launcher(cfg.hydra.get("launcher"))


def dry_build(cfg: DictConfig) -> None:
    """Instantiate the cheap components (quantizers, estimator, schedules) to surface bad
    option values (e.g. an unknown scale_method) before any job starts."""
    from qexp.train.build import instantiate, quantizer_factory

    body = quantizer_factory(cfg.quantizer, "quantizer")
    edge = quantizer_factory(cfg.layers.edge_quantizer, "layers.edge_quantizer")
    for role, bits in (("weight", cfg.w_bits), ("activation", cfg.a_bits)):
        body(role, as_bits(bits))
        for edge_bits in (cfg.layers.first_bits, cfg.layers.last_bits):
            if edge_bits is not None:
                edge(role, int(edge_bits))
    estimator = instantiate(cfg.estimator, "estimator")
    for key, node in cfg.schedule.items():
        if isinstance(node, DictConfig) and "_target_" in node:
            instantiate(node, f"schedule.{key}")
    from qexp.estimators.compat import check_pairing

    weight = body("weight", as_bits(cfg.w_bits))
    check_pairing(estimator, weight, body("activation", as_bits(cfg.a_bits)))
    check_budget_reachable(cfg)


def has_layer_plan(cfg: DictConfig) -> bool:
    """Whether the run sets anything per layer worth a table before it starts: override
    rules, quantized embeddings or quantized products."""
    layers = cfg.layers
    return bool(layers.get("overrides")) or any(
        layers.get(key) is not None for key in ("embed_bits", "matmul_bits")
    )


def check_layer_plan(cfg: DictConfig, show: bool) -> None:
    """Resolve the per-layer override rules on the real network (a rule that matches nothing
    is an error naming the layers there are) and, with ``show``, print the resolved table
    before any work starts."""
    from qexp.quant.overrides import format_plan
    from qexp.train.build import build_data, build_net
    from qexp.train.run import layer_plan, run_spec

    spec = run_spec(cfg)
    plan = layer_plan(spec, build_net(spec.model, build_data(spec.dataset).info))
    if show:
        print(f"qexp: per-layer settings:\n{format_plan(plan)}", flush=True)


def check_budget_reachable(cfg: DictConfig) -> None:
    """Refuse a memory budget where no bit width can move, or below the smallest size the
    model can reach (one line naming it); builds the data set and the quantized network only
    when a budget is set."""
    from qexp.quant.budget import budget_from_spec, check_reachable, measure_layers
    from qexp.train.build import build_data
    from qexp.train.run import build_quantized_net, run_spec

    spec = run_spec(cfg)
    budget = budget_from_spec(spec.budget)
    if not budget.active:
        return
    info = build_data(spec.dataset).info
    net = build_quantized_net(spec, info)
    if not any(q.learns_bits for q in net.modules() if isinstance(q, Quantizer)):
        raise QexpError(
            "budget.* is set but no quantizer learns its bit width: use a learned-precision "
            "quantizer (quantizer=dq_u1 | dq_u2 | dq_u3 | dq_pow2) or drop the budget"
        )
    layers = measure_layers(net, info.example_input())
    budget.bind(layers)
    check_reachable(budget, layers)
