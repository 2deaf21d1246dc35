"""Search spaces: each method declares its knobs and ranges beside its own config.

``conf/search_space/common.yaml`` holds what every method tunes (the learning rate);
``conf/search_space/estimator/<name>.yaml`` an estimator's own knobs and
``conf/search_space/quantizer/<name>.yaml`` a learned quantizer's. A new method brings its
search space by adding its file; ``qexp train`` never reads these files.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from qexp.errors import QexpError

TYPES = ("float", "int", "categorical")


@dataclass(frozen=True)
class Knob:
    """One tuned config key and its range."""

    key: str
    type: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: tuple[Any, ...] = ()
    also: tuple[str, ...] = ()  # keys that get the same value (e.g. AQE's beta_max)

    def overrides(self, value: Any) -> list[str]:
        """Hydra overrides setting this knob (and its ``also`` keys) to ``value``."""
        text = repr(value) if isinstance(value, float) else str(value)
        return [f"{k}={text}" for k in (self.key, *self.also)]


def parse_knob(key: str, node: Any) -> Knob:
    """A :class:`Knob` from its YAML entry; one-line errors for a bad range."""
    if not isinstance(node, dict) or node.get("type") not in TYPES:
        raise QexpError(f"search space {key}: give type: one of {', '.join(TYPES)}")
    also = tuple(str(k) for k in node.get("also") or ())
    if node["type"] == "categorical":
        choices = tuple(node.get("choices") or ())
        if not choices:
            raise QexpError(f"search space {key}: a categorical knob needs choices")
        return Knob(key, "categorical", choices=choices, also=also)
    low, high, log = node.get("low"), node.get("high"), bool(node.get("log", False))
    if low is None or high is None or not float(low) < float(high):
        raise QexpError(f"search space {key}: needs low < high, got {low}, {high}")
    if log and float(low) <= 0:
        raise QexpError(f"search space {key}: a log range needs low > 0")
    return Knob(key, node["type"], float(low), float(high), log, also=also)


def _space_file(config_dirs: tuple[Path, ...], *parts: str) -> Path:
    """The search-space file ``parts`` in the first of the user's config dirs that has it,
    else qexp's own (which may not exist either)."""
    for folder in config_dirs:
        path = Path(folder).joinpath("search_space", *parts)
        if path.is_file():
            return path
    return Path(str(resources.files("qexp.conf").joinpath("search_space", *parts)))


def _read(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise QexpError(f"search space {path}: {str(exc).splitlines()[0]}") from None
    return dict(data) if isinstance(data, dict) else {}


def search_space(
    estimator: str,
    quantizer: str,
    extra: dict[str, Any] | None = None,
    config_dirs: tuple[Path, ...] = (),
) -> list[Knob]:
    """The knobs of a method: common, then its estimator's, its quantizer's, then ``extra``
    (a study's own additions); a later entry for a key replaces an earlier one. A method with
    no search-space file of its own is tuned on the common knobs (:func:`own_space` tells).
    ``config_dirs``: a user's config dirs, whose ``search_space/`` files come first."""
    merged: dict[str, Any] = {}
    merged.update(_read(_space_file(config_dirs, "common.yaml")))
    merged.update(_read(_space_file(config_dirs, "estimator", f"{estimator}.yaml")))
    merged.update(_read(_space_file(config_dirs, "quantizer", f"{quantizer}.yaml")))
    merged.update(extra or {})
    return [parse_knob(k, v) for k, v in merged.items()]


def own_space(estimator: str, quantizer: str, config_dirs: tuple[Path, ...] = ()) -> bool:
    """Whether the method's estimator or quantizer has a search-space file (else it is tuned
    on the common knobs only, and the study report says so)."""
    return any(
        _space_file(config_dirs, group, f"{name}.yaml").is_file()
        for group, name in (("estimator", estimator), ("quantizer", quantizer))
    )


def suggest(trial: Any, knobs: list[Knob]) -> dict[str, Any]:
    """Draw every knob from an Optuna ``trial``; returns key -> value."""
    values: dict[str, Any] = {}
    for k in knobs:
        if k.type == "categorical":
            values[k.key] = trial.suggest_categorical(k.key, list(k.choices))
        elif k.type == "int":
            values[k.key] = trial.suggest_int(k.key, int(k.low), int(k.high), log=k.log)
        else:
            values[k.key] = trial.suggest_float(k.key, k.low, k.high, log=k.log)
    return values


def knob_overrides(knobs: list[Knob], values: dict[str, Any]) -> list[str]:
    """Hydra overrides for chosen ``values`` of ``knobs``."""
    out: list[str] = []
    for k in knobs:
        if k.key in values:
            out.extend(k.overrides(values[k.key]))
    return out


def describe(knob: Knob) -> str:
    """The range of a knob in words, for the report."""
    if knob.type == "categorical":
        return "{" + ", ".join(map(str, knob.choices)) + "}"
    scale = " (log)" if knob.log else ""
    low = int(knob.low) if knob.type == "int" else knob.low
    high = int(knob.high) if knob.type == "int" else knob.high
    assert low is not None and high is not None and math.isfinite(float(high))
    return f"[{low:g}, {high:g}]{scale}"
