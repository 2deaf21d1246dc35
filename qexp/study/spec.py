"""What a study compares and how: a preset YAML (conf/study/<name>.yaml) read into dataclasses.

The spec is plain data, checked here so that a wrong key ends in one line before any training.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from qexp.errors import QexpError

#: top-level keys of a study spec
SPEC_KEYS = {
    "name", "base", "reference", "seeds", "tuning", "final", "settings", "methods", "claims",
    "alpha", "notes", "plateau",
}


@dataclass(frozen=True)
class Setting:
    """One column of the comparison: a bit width and the quantizer form it is run in."""

    key: str  # short id used in dirs and tables, e.g. "w1a1"
    title: str  # e.g. "W1/A1 (BinaryNet form)"
    bits: int
    baseline: str  # the method every other one is compared with here
    overrides: tuple[str, ...] = ()


@dataclass(frozen=True)
class Method:
    """One row: an estimator configuration, with extra overrides per setting if needed."""

    name: str
    overrides: tuple[str, ...]
    at: dict[str, tuple[str, ...]] = field(default_factory=dict)  # setting key -> overrides
    space: dict[str, Any] = field(default_factory=dict)  # entries added to its search space


@dataclass(frozen=True)
class Claim:
    """A paper's claim, placed beside the measured paired difference of one cell."""

    method: str
    setting: str
    text: str
    source: str
    diff: float | None = None  # claimed accuracy gain over the baseline (fraction), if numeric
    #: the training budget and optimizer the claim is tested at (None: at every one the
    #: study runs; each (budget, optimizer) is then one more test of the confirmatory family)
    budget: float | None = None
    optimizer: str | None = None


@dataclass(frozen=True)
class Tuning:
    """The per-method tuning budget (equal for every method)."""

    trials: int
    seed: int  # the run seed of tuning runs (its reference is the start point)
    overrides: tuple[str, ...]
    sampler_seed: int = 0
    prune_startup_trials: int = 2  # trials finished before pruning starts
    prune_warmup_epochs: int = 1  # epochs of a trial never pruned


@dataclass(frozen=True)
class Plateau:
    """When a reference counts as converged: its best validation accuracy of the last
    ``window`` epochs beats the best before them by less than ``tolerance`` (a fraction)."""

    window: int = 3
    tolerance: float = 0.005


@dataclass(frozen=True)
class StudySpec:
    """A whole study."""

    name: str
    base: tuple[str, ...]
    reference: tuple[str, ...]
    seeds: tuple[int, ...]
    tuning: Tuning
    final: tuple[str, ...]
    settings: tuple[Setting, ...]
    methods: tuple[Method, ...]
    claims: tuple[Claim, ...] = ()
    alpha: float = 0.05  # family-wise error rate of the verdicts (Holm)
    plateau: Plateau = field(default_factory=Plateau)
    raw: dict[str, Any] = field(default_factory=dict, compare=False)

    def method(self, name: str) -> Method:
        """The method called ``name``."""
        return next(m for m in self.methods if m.name == name)


def preset_path(name_or_path: str) -> Path:
    """The YAML file of a preset name (conf/study/<name>.yaml) or of a path."""
    path = Path(name_or_path).expanduser()
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise QexpError(f"study spec {path} not found")
        return path
    candidate = Path(str(resources.files("qexp.conf") / "study" / f"{name_or_path}.yaml"))
    if not candidate.is_file():
        folder = Path(str(resources.files("qexp.conf") / "study"))
        names = sorted(p.stem for p in folder.glob("*.yaml"))
        raise QexpError(
            f"no study preset {name_or_path!r}; presets: {', '.join(names)} (or give a YAML path)"
        )
    return candidate


def _strs(value: Any, key: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise QexpError(f"study spec: {key} must be a list of override strings like 'a.b=1'")
    return tuple(value)


def _need(node: dict[str, Any], key: str, where: str) -> Any:
    if key not in node:
        raise QexpError(f"study spec: {where} needs a '{key}' entry")
    return node[key]


def parse_spec(plain: dict[str, Any]) -> StudySpec:
    """A :class:`StudySpec` from the plain dict of a spec file."""
    unknown = set(plain) - SPEC_KEYS
    if unknown:
        raise QexpError(f"study spec: unknown keys {sorted(unknown)}; allowed: {sorted(SPEC_KEYS)}")
    settings = []
    for i, node in enumerate(_need(plain, "settings", "the spec") or []):
        settings.append(
            Setting(
                key=str(_need(node, "key", f"settings[{i}]")),
                title=str(node.get("title") or node["key"]),
                bits=int(_need(node, "bits", f"settings[{i}]")),
                baseline=str(_need(node, "baseline", f"settings[{i}]")),
                overrides=_strs(node.get("overrides"), f"settings[{i}].overrides"),
            )
        )
    methods = []
    for name, node in (_need(plain, "methods", "the spec") or {}).items():
        node = node or {}
        at = {k: _strs(v, f"methods.{name}.at.{k}") for k, v in (node.get("at") or {}).items()}
        methods.append(
            Method(
                name=str(name),
                overrides=_strs(node.get("overrides"), f"methods.{name}.overrides"),
                at=at,
                space=dict(node.get("space") or {}),
            )
        )
    tuning = _need(plain, "tuning", "the spec")
    seeds = tuple(int(s) for s in _need(plain, "seeds", "the spec"))
    spec = StudySpec(
        name=str(_need(plain, "name", "the spec")),
        base=_strs(plain.get("base"), "base"),
        reference=_strs(plain.get("reference"), "reference"),
        seeds=seeds,
        tuning=Tuning(
            trials=int(_need(tuning, "trials", "tuning")),
            seed=int(tuning.get("seed", seeds[0] if seeds else 0)),
            overrides=_strs(tuning.get("overrides"), "tuning.overrides"),
            sampler_seed=int(tuning.get("sampler_seed", 0)),
            prune_startup_trials=int(tuning.get("prune_startup_trials", 2)),
            prune_warmup_epochs=int(tuning.get("prune_warmup_epochs", 1)),
        ),
        final=_strs(plain.get("final"), "final"),
        settings=tuple(settings),
        methods=tuple(methods),
        claims=tuple(
            Claim(
                method=str(c["method"]),
                setting=str(c["setting"]),
                text=str(c["text"]),
                source=str(c.get("source", "")),
                diff=None if c.get("diff") is None else float(c["diff"]),
                budget=None if c.get("budget") is None else float(c["budget"]),
                optimizer=None if c.get("optimizer") is None else str(c["optimizer"]),
            )
            for c in plain.get("claims") or []
        ),
        alpha=float(plain.get("alpha", 0.05)),
        plateau=_plateau(plain.get("plateau") or {}),
        raw=plain,
    )
    _check(spec)
    return spec


def _plateau(node: dict[str, Any]) -> Plateau:
    unknown = set(node) - {"window", "tolerance"}
    if unknown:
        raise QexpError(f"study spec: plateau takes window and tolerance, not {sorted(unknown)}")
    plateau = Plateau(int(node.get("window", 3)), float(node.get("tolerance", 0.005)))
    if plateau.window < 1 or not 0 <= plateau.tolerance < 1:
        raise QexpError("study spec: plateau.window must be >= 1, 0 <= plateau.tolerance < 1")
    return plateau


def _check(spec: StudySpec) -> None:
    names = {m.name for m in spec.methods}
    keys = [s.key for s in spec.settings]
    if not spec.methods or not spec.settings:
        raise QexpError("study spec: give at least one method and one setting")
    if len(set(keys)) != len(keys):
        raise QexpError(f"study spec: setting keys must be unique, got {keys}")
    for s in spec.settings:
        if s.baseline not in names:
            raise QexpError(f"study spec: baseline {s.baseline!r} of {s.key} is not a method")
    for m in spec.methods:
        for k in m.at:
            if k not in keys:
                raise QexpError(f"study spec: methods.{m.name}.at.{k}: no such setting")
    if len(spec.seeds) < 2 or len(set(spec.seeds)) != len(spec.seeds):
        raise QexpError("study spec: seeds must be at least two distinct seeds (paired statistics)")
    if spec.tuning.trials < 1:
        raise QexpError("study spec: tuning.trials must be >= 1")
    if not 0 < spec.alpha < 1:
        raise QexpError("study spec: alpha must lie between 0 and 1")
