"""Checks a composed run config before any work starts.

OmegaConf's schema (qexp.config.schema) already rejects wrong types and unknown keys at the top
level. This module adds what a type cannot say: value ranges, choices, and, for every component
built from ``_target_``, that each option is an argument of that target with a fitting type.
Every problem raises QexpError with a one-line message naming the key and what is allowed.
"""

from __future__ import annotations

import collections.abc
import importlib
import inspect
import re
import types
import typing
from typing import Any, Union

from omegaconf import DictConfig, OmegaConf

from qexp.bitwidth import BITS_ALLOWED, valid_bits
from qexp.errors import QexpError
from qexp.spec import AMP_DTYPES, COMPILE_MODES, OPTIMIZERS, PROGRESS_MODES, BudgetSpec

GROUPS = ("model", "dataset", "quantizer", "estimator", "schedule")
#: keys of a component node that are not constructor arguments
RESERVED = {"_target_", "_partial_", "_recursive_", "_convert_", "_args_", "name"}


def _fail(key: str, value: Any, allowed: str) -> None:
    raise QexpError(f"{key}={value!r} is not allowed: use {allowed}")


def _check(cond: bool, key: str, value: Any, allowed: str) -> None:
    if not cond:
        _fail(key, value, allowed)


def validate_config(cfg: DictConfig) -> None:
    """Raise QexpError on the first invalid value of ``cfg``; return None when all is well."""
    try:
        plain = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except Exception as exc:  # interpolation or missing-value errors from OmegaConf
        msg = str(exc).splitlines()[0]
        raise QexpError(f"config cannot be resolved: {msg}") from None
    assert isinstance(plain, dict)
    plain.pop("hydra", None)

    for key in ("bits", "w_bits", "a_bits"):
        _check(valid_bits(plain[key]), key, plain[key], BITS_ALLOWED)
    layers = plain["layers"]
    for key in ("first_bits", "last_bits"):
        v = layers[key]
        _check(
            v is None or valid_bits(v),
            f"layers.{key}",
            v,
            "null (same as the run), an integer from 1 to 16, or 32 for full precision",
        )
    _check(plain["seed"] >= 0, "seed", plain["seed"], "a non-negative integer")

    t = plain["trainer"]
    _check(t["epochs"] >= 1, "trainer.epochs", t["epochs"], "an integer >= 1")
    _check(t["batch_size"] >= 1, "trainer.batch_size", t["batch_size"], "an integer >= 1")
    patience = t.get("patience")
    _check(
        patience is None or patience >= 1, "trainer.patience", patience, "null or an integer >= 1"
    )
    _check(
        t["eval_batch_size"] >= 1,
        "trainer.eval_batch_size",
        t["eval_batch_size"],
        "an integer >= 1",
    )
    _check(t["lr"] > 0, "trainer.lr", t["lr"], "a positive number")
    _check(
        t["optimizer"] in OPTIMIZERS, "trainer.optimizer", t["optimizer"], " | ".join(OPTIMIZERS)
    )
    _check(0 <= t["momentum"] < 1, "trainer.momentum", t["momentum"], "a number in [0, 1)")
    _check(t["weight_decay"] >= 0, "trainer.weight_decay", t["weight_decay"], "a number >= 0")
    ql = t["quantizer_lr"]
    _check(
        ql is None or ql > 0, "trainer.quantizer_lr", ql, "null (same as lr) or a positive number"
    )
    gc = t["grad_clip"]
    _check(gc is None or gc > 0, "trainer.grad_clip", gc, "null or a positive number")
    _check(
        re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", t["device"]) is not None,
        "trainer.device",
        t["device"],
        "auto | cpu | cuda | cuda:N | mps",
    )
    _check(
        t["amp_dtype"] in AMP_DTYPES, "trainer.amp_dtype", t["amp_dtype"], " | ".join(AMP_DTYPES)
    )
    th = t["threads"]
    _check(
        th is None or th >= 1, "trainer.threads", th, "null (torch's default) or an integer >= 1"
    )
    progress = " | ".join(PROGRESS_MODES)
    _check(t["progress"] in PROGRESS_MODES, "trainer.progress", t["progress"], progress)
    modes = " | ".join(COMPILE_MODES)
    _check(t["compile"] in COMPILE_MODES, "trainer.compile", t["compile"], modes)
    _check(t["log_every"] >= 1, "trainer.log_every", t["log_every"], "an integer >= 1")

    for group in GROUPS:
        node = plain.get(group)
        if not isinstance(node, dict):
            raise QexpError(f"config group '{group}' is missing: pick one with {group}=<option>")
        check_component(group, node)
    check_component("layers.edge_quantizer", layers["edge_quantizer"])
    from qexp.quant.budget import budget_from_spec

    budget_from_spec(BudgetSpec(**plain["budget"]))


def _import(path: str, key: str) -> Any:
    module_name, _, attr = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError):
        raise QexpError(f"{key}._target_={path!r} cannot be imported: check the name") from None


def check_component(key: str, node: Any) -> None:
    """Check a config node holding ``_target_`` (and any nested ones) against its target."""
    if not isinstance(node, dict):
        return
    target = node.get("_target_")
    if target is None:
        for k, v in node.items():
            check_component(f"{key}.{k}", v)
        return
    obj = _import(target, key)
    func = obj.__init__ if inspect.isclass(obj) else obj
    sig = inspect.signature(func)
    params = {n: p for n, p in sig.parameters.items() if n != "self"}
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    try:
        hints = typing.get_type_hints(func)
    except Exception:  # unresolvable annotations: skip type checks, keep name checks
        hints = {}
    label = node.get("name") or target.rpartition(".")[2]
    for opt, value in node.items():
        if opt in RESERVED:
            continue
        if opt not in params and not takes_any:
            options = ", ".join(sorted(n for n in params if n not in ("bits", "role"))) or "none"
            raise QexpError(f"{key}.{opt} is not an option of {label}; its options are: {options}")
        hint = hints.get(opt)
        if isinstance(value, dict) and "_target_" in value:
            check_component(f"{key}.{opt}", value)
        elif hint is not None and not _matches(value, hint):
            if typing.get_origin(hint) is typing.Literal:
                raise QexpError(f"{key}.{opt}={value!r} is not allowed: use {_type_name(hint)}")
            raise QexpError(
                f"{key}.{opt}={value!r} has the wrong type: {label} expects {_type_name(hint)}"
            )


def _matches(value: Any, hint: Any) -> bool:
    """Loose runtime check of a plain config value against a type hint."""
    origin = typing.get_origin(hint)
    if hint is Any:
        return True
    if origin is typing.Literal:
        return value in typing.get_args(hint)
    if origin in (Union, types.UnionType):
        return any(_matches(value, a) for a in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    seqs = (list, tuple, collections.abc.Sequence)
    if hint in seqs or origin in seqs:
        return isinstance(value, (list, tuple))
    maps = (dict, collections.abc.Mapping)
    if hint in maps or origin in maps:
        return isinstance(value, dict)
    return True


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) is typing.Literal:
        return " | ".join(str(a) for a in typing.get_args(hint))
    return str(hint).replace("typing.", "").replace("<class '", "").replace("'>", "")
