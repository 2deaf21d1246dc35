"""What a study compares and how: a preset YAML (conf/study/<name>.yaml) read into dataclasses.

The spec is plain data, checked here so that a wrong key ends in one line before any training.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from qexp.bitwidth import BITS_ALLOWED, as_bits, valid_bits
from qexp.errors import QexpError

#: top-level keys of a study spec
SPEC_KEYS = {
    "name", "base", "reference", "seeds", "tuning", "final", "settings", "methods", "claims",
    "alpha", "notes", "plateau", "aa_seeds", "aa_reference", "controls", "carry_check",
}
#: top-level keys that shape only the analysis and the report, never a run: a study dir
#: accepts a spec that differs from its study.json in these alone (a note reworded, a claim
#: or a control added after the runs)
REPORT_ONLY_KEYS = ("notes", "claims", "controls", "alpha")
#: top-level keys free to change after the runs: the report-only ones, and checks that add
#: runs of their own without changing any other run
UNBOUND_KEYS = (*REPORT_ONLY_KEYS, "carry_check")
#: keys of one setting
SETTING_KEYS = {
    "key", "title", "bits", "baseline", "overrides", "budget", "optimizer", "final", "tuning",
    "knobs_from", "methods", "init", "aa", "group", "space",
}
#: keys of the tuning node
TUNING_KEYS = {
    "trials", "seed", "seeds", "overrides", "sampler_seed", "startup_trials",
    "prune_startup_trials", "prune_warmup_epochs", "prune_before_deployed", "prune_last_epoch",
}


def _setting_bits(value: Any, where: str) -> float:
    """A setting's ``bits``: a width of qexp's vocabulary (ints stay ints, 1.58 is ternary)."""
    if not valid_bits(value):
        raise QexpError(f"study spec: {where}.bits={value!r} is not allowed: use {BITS_ALLOWED}")
    return as_bits(value)


@dataclass(frozen=True)
class Setting:
    """One column of the comparison: a bit width and the quantizer form it is run in."""

    key: str  # short id used in dirs and tables, e.g. "w1a1"
    title: str  # e.g. "W1/A1 (BinaryNet form)"
    bits: float  # an int, or 1.58 (ternary; qexp.bitwidth)
    baseline: str  # the method every other one is compared with here
    overrides: tuple[str, ...] = ()  # every run of the setting (tuning and final)
    budget: float | None = None  # training length label (epochs), for tables and figures
    optimizer: str | None = None  # optimizer label (adam, sgd), for tables and figures
    final: tuple[str, ...] = ()  # final runs only, after the spec's ``final``
    tuning: tuple[str, ...] = ()  # tuning trials only, after the spec's ``tuning.overrides``
    knobs_from: str | None = None  # take the knobs tuned in that setting instead of tuning
    methods: tuple[str, ...] = ()  # the methods run here (empty: every method)
    init: str = "reference"  # reference: start from the seed's reference | scratch
    aa: bool = False  # also run the baseline over the spec's aa_seeds here (an A/A row)
    #: search-space entries of this setting's tuning (e.g. SGD's own LR range), after the
    #: method's own
    space: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)
    #: the row of tables and claims this setting belongs to: settings that differ only in
    #: budget or optimizer share one (e.g. "w1a1"); None: the setting's own key
    group: str | None = None

    @property
    def row(self) -> str:
        """The setting's name in results, tables and claims (its group, else its key)."""
        return self.group or self.key


@dataclass(frozen=True)
class Method:
    """One row: an estimator configuration, with extra overrides per setting if needed."""

    name: str
    overrides: tuple[str, ...]
    #: setting key, or row (a setting's group), -> extra overrides there (the key wins)
    at: dict[str, tuple[str, ...]] = field(default_factory=dict)
    space: dict[str, Any] = field(default_factory=dict)  # entries added to its search space

    def overrides_at(self, setting: Setting) -> tuple[str, ...]:
        """The method's extra overrides in ``setting`` (by its key, else by its row)."""
        if setting.key in self.at:
            return self.at[setting.key]
        return self.at.get(setting.row, ())


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
class Control:
    """A planned comparison of ``method`` with ``against`` besides the baseline one (e.g.
    block replacement against its own quantizer with plain STE), in every condition that
    runs both and where neither is the baseline (that test is made anyway); part of the
    exploratory family."""

    method: str
    against: str
    text: str = ""


@dataclass(frozen=True)
class CarryCheck:
    """The small check that knobs tuned at one budget carry to a setting that borrows them
    (``knobs_from``): for each of ``methods``, the borrowed knobs with the learning rate
    times each of ``lr_scales`` (1 among them), trained at the borrowing setting's budget on
    the tuning seeds, validation only. The borrowed LR carries if no other scale beats it."""

    methods: tuple[str, ...]
    lr_scales: tuple[float, ...] = (1 / 3, 1.0, 3.0)
    #: a gap (validation accuracy, a fraction) of the borrowed LR behind the best scale above
    #: which the report marks the cell's final runs as run on knobs that did not carry
    #: (qexp's choice: 1 point, about twice the A/A spread of two seeds' mean)
    tolerance: float = 0.01
    #: the checked cells' final runs train at the check's best LR scale (a 3-point LR
    #: re-tune at the borrowing budget, on the tuning seeds) instead of the borrowed LR
    adopt: bool = False


@dataclass(frozen=True)
class Tuning:
    """The per-method tuning budget (equal for every method)."""

    trials: int
    seed: int  # the run seed of tuning runs (its reference is the start point)
    overrides: tuple[str, ...]
    sampler_seed: int = 0
    prune_startup_trials: int = 2  # trials finished before pruning starts
    prune_warmup_epochs: int = 1  # the first epoch a trial may be pruned at (n_warmup_steps)
    #: every seed a trial trains on (its objective is their mean validation accuracy)
    seeds: tuple[int, ...] = ()
    #: TPE's random start (trials drawn at random before it models); None: Optuna's default 10
    startup_trials: int | None = None
    #: never prune a trial at an epoch whose last step came before its method trains its
    #: deployed form (the estimator's final_form_progress at the trial's knobs): a soft phase
    #: is not judged on the hard network
    prune_before_deployed: bool = False
    #: let the pruner stop a trial at its last epoch (Optuna's pruners do; it saves no
    #: compute and turns a finished trial into a pruned one): qexp's choice, False skips it
    prune_last_epoch: bool = True

    @property
    def all_seeds(self) -> tuple[int, ...]:
        """The tuning seeds (``seeds``, else the one ``seed``)."""
        return self.seeds or (self.seed,)


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
    #: the baseline's extra seeds, disjoint from ``seeds``: an A/A row (baseline vs itself)
    aa_seeds: tuple[int, ...] = ()
    #: where an A/A run starts: "paired" (A/A seed i from the reference of ``seeds[i]``, the
    #: float start its partner run has: the noise floor of a paired comparison) | "own" (its
    #: own reference, the noise of two independent runs)
    aa_reference: str = "paired"
    controls: tuple[Control, ...] = ()
    carry_check: CarryCheck | None = None

    def reference_seed(self, seed: int) -> int:
        """The seed of the reference run ``seed`` starts from (itself, or for a paired A/A
        seed the evaluation seed it is paired with)."""
        if self.aa_reference == "paired" and seed in self.aa_seeds:
            return self.seeds[self.aa_seeds.index(seed) % len(self.seeds)]
        return seed

    def method(self, name: str) -> Method:
        """The method called ``name``."""
        return next(m for m in self.methods if m.name == name)

    def setting(self, key: str) -> Setting:
        """The setting called ``key``."""
        return next(s for s in self.settings if s.key == key)

    def methods_of(self, setting: Setting) -> tuple[Method, ...]:
        """The methods run in ``setting``."""
        if not setting.methods:
            return self.methods
        return tuple(m for m in self.methods if m.name in setting.methods)


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


def _count(value: Any, key: str) -> int:
    """A whole number >= 0 of the spec (a count of trials or epochs)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise QexpError(f"study spec: {key}={value!r} must be a whole number >= 0")
    return value


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
        where = f"settings[{i}]"
        extra = set(node) - SETTING_KEYS
        if extra:
            raise QexpError(f"study spec: {where} has unknown keys {sorted(extra)}; allowed: "
                            f"{sorted(SETTING_KEYS)}")  # fmt: skip
        settings.append(
            Setting(
                key=str(_need(node, "key", where)),
                title=str(node.get("title") or node["key"]),
                bits=_setting_bits(_need(node, "bits", where), where),
                baseline=str(_need(node, "baseline", where)),
                overrides=_strs(node.get("overrides"), f"{where}.overrides"),
                budget=None if node.get("budget") is None else float(node["budget"]),
                optimizer=None if node.get("optimizer") is None else str(node["optimizer"]),
                final=_strs(node.get("final"), f"{where}.final"),
                tuning=_strs(node.get("tuning"), f"{where}.tuning"),
                knobs_from=None if node.get("knobs_from") is None else str(node["knobs_from"]),
                methods=tuple(str(m) for m in node.get("methods") or ()),
                init=str(node.get("init", "reference")),
                aa=bool(node.get("aa", False)),
                group=None if node.get("group") is None else str(node["group"]),
                space=dict(node.get("space") or {}),
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
    extra = set(tuning) - TUNING_KEYS
    if extra:
        raise QexpError(f"study spec: tuning has unknown keys {sorted(extra)}; allowed: "
                        f"{sorted(TUNING_KEYS)}")  # fmt: skip
    seeds = tuple(int(s) for s in _need(plain, "seeds", "the spec"))
    tuning_seeds = tuple(int(s) for s in tuning.get("seeds") or ())
    spec = StudySpec(
        name=str(_need(plain, "name", "the spec")),
        base=_strs(plain.get("base"), "base"),
        reference=_strs(plain.get("reference"), "reference"),
        seeds=seeds,
        tuning=Tuning(
            trials=int(_need(tuning, "trials", "tuning")),
            seed=int(tuning.get("seed", tuning_seeds[0] if tuning_seeds else
                                 seeds[0] if seeds else 0)),  # fmt: skip
            overrides=_strs(tuning.get("overrides"), "tuning.overrides"),
            sampler_seed=int(tuning.get("sampler_seed", 0)),
            prune_startup_trials=_count(tuning.get("prune_startup_trials", 2),
                                        "tuning.prune_startup_trials"),
            prune_warmup_epochs=_count(tuning.get("prune_warmup_epochs", 1),
                                       "tuning.prune_warmup_epochs"),
            seeds=tuning_seeds,
            startup_trials=None if tuning.get("startup_trials") is None
            else int(tuning["startup_trials"]),
            prune_before_deployed=bool(tuning.get("prune_before_deployed", False)),
            prune_last_epoch=bool(tuning.get("prune_last_epoch", True)),
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
        aa_seeds=tuple(int(s) for s in plain.get("aa_seeds") or ()),
        aa_reference=str(plain.get("aa_reference", "paired")),
        controls=tuple(_control(c) for c in plain.get("controls") or []),
        carry_check=_carry_check(plain.get("carry_check")),
    )
    _check(spec)
    return spec


def _control(node: Any) -> Control:
    if not isinstance(node, dict) or set(node) - {"method", "against", "text"} or not (
        node.get("method") and node.get("against")
    ):
        raise QexpError(f"study spec: a control is {{method: M, against: N, text: ...}}, not "
                        f"{node!r}")  # fmt: skip
    return Control(str(node["method"]), str(node["against"]), str(node.get("text", "")))


def _carry_check(node: Any) -> CarryCheck | None:
    if node is None:
        return None
    keys = {"methods", "lr_scales", "tolerance", "adopt"}
    if not isinstance(node, dict) or set(node) - keys or not node.get("methods"):
        raise QexpError("study spec: carry_check is {methods: [...], lr_scales: [0.33, 1, 3], "
                        "tolerance: 0.01, adopt: false}")  # fmt: skip
    try:
        scales = tuple(float(x) for x in node.get("lr_scales") or (1 / 3, 1.0, 3.0))
        tolerance = float(node.get("tolerance", 0.01))
    except (TypeError, ValueError):
        raise QexpError("study spec: carry_check.lr_scales are numbers (e.g. [0.33, 1, 3]) and "
                        "carry_check.tolerance a fraction (0.01: one point)") from None
    if len({f"{x:.3g}" for x in scales}) != len(scales):
        raise QexpError("study spec: carry_check.lr_scales must differ in their first 3 digits "
                        "(they name the runs' folders)")  # fmt: skip
    if 1.0 not in scales or min(scales) <= 0:
        raise QexpError("study spec: carry_check.lr_scales must be positive and include 1 "
                        "(the borrowed LR itself)")  # fmt: skip
    if not 0 <= tolerance < 1:
        raise QexpError(f"study spec: carry_check.tolerance={tolerance} is a fraction of "
                        "accuracy in [0, 1) (0.01: one point)")  # fmt: skip
    adopt = node.get("adopt", False)
    if not isinstance(adopt, bool):
        raise QexpError(f"study spec: carry_check.adopt={adopt!r} is true or false")
    return CarryCheck(tuple(str(m) for m in node["methods"]), scales, tolerance, adopt)


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
        unknown = [m for m in s.methods if m not in names]
        if unknown or (s.methods and s.baseline not in s.methods):
            raise QexpError(f"study spec: {s.key}.methods must name methods of the spec, its "
                            f"baseline {s.baseline!r} among them")  # fmt: skip
        if s.knobs_from is not None:
            source = next((t for t in spec.settings if t.key == s.knobs_from), None)
            if source is None or source.knobs_from is not None:
                raise QexpError(f"study spec: {s.key}.knobs_from must name a setting that "
                                "tunes its own knobs")  # fmt: skip
            missing = [m.name for m in spec.methods_of(s) if m not in spec.methods_of(source)]
            if missing:
                raise QexpError(f"study spec: {s.key} takes its knobs from {source.key}, which "
                                f"does not run {', '.join(missing)}")  # fmt: skip
        same_row = [t for t in spec.settings if t.row == s.row]
        if any(t.baseline != s.baseline for t in same_row):
            raise QexpError(f"study spec: the settings of row {s.row!r} must share a baseline")
        if len({(t.budget, t.optimizer) for t in same_row}) != len(same_row):
            raise QexpError(f"study spec: settings of row {s.row!r} must differ in budget or "
                            "optimizer")  # fmt: skip
        if s.init not in ("reference", "scratch"):
            raise QexpError(f"study spec: {s.key}.init: use reference | scratch")
    overlap = set(spec.tuning.all_seeds) & set(spec.seeds)
    if spec.tuning.seeds and overlap:
        raise QexpError(
            f"study spec: tuning.seeds and seeds must be disjoint (both have {sorted(overlap)}):"
            " a tuning seed is never an evaluation seed"
        )
    if set(spec.aa_seeds) & (set(spec.seeds) | set(spec.tuning.all_seeds)):
        raise QexpError("study spec: aa_seeds must be disjoint from seeds and tuning seeds")
    if spec.aa_reference not in ("paired", "own"):
        raise QexpError("study spec: aa_reference: use paired | own")
    if spec.carry_check is not None:
        unknown = [m for m in spec.carry_check.methods if m not in names]
        if unknown:
            raise QexpError(f"study spec: carry_check.methods {unknown} are not methods")
        if not any(s.knobs_from for s in spec.settings):
            raise QexpError("study spec: carry_check needs a setting with knobs_from")
    for c in spec.controls:
        if c.method not in names or c.against not in names or c.method == c.against:
            raise QexpError(f"study spec: control {c.method} against {c.against}: name two "
                            "different methods of the spec")  # fmt: skip
    for m in spec.methods:
        rows = {s.row for s in spec.settings}
        for k in m.at:
            if k not in keys and k not in rows:
                raise QexpError(f"study spec: methods.{m.name}.at.{k}: no such setting or row")
    if len(spec.seeds) < 2 or len(set(spec.seeds)) != len(spec.seeds):
        raise QexpError("study spec: seeds must be at least two distinct seeds (paired statistics)")
    if spec.tuning.trials < 1:
        raise QexpError("study spec: tuning.trials must be >= 1")
    if not 0 < spec.alpha < 1:
        raise QexpError("study spec: alpha must lie between 0 and 1")
