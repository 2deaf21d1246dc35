"""Per-layer overrides: rules that set a layer's bits, quantizer options or keep it in float.

A run's ``layers.overrides`` is a list of rules, applied in order after the first/last-layer
policy (``layers.first_bits`` / ``layers.last_bits``); a later rule wins over an earlier one
for the keys it sets. On the command line (quote the whole override for the shell)::

    qexp train 'layers.overrides=[{match: stage2, w_bits: 2}]'
    qexp train 'layers.overrides=[{match: "re:stage\\d\\.0", bits: 3}, {match: fc, float: true}]'
    qexp train 'layers.overrides=[{match: type:Linear, quantizer: {scale_method: max_abs}}]'

or in a YAML file (``layers: {overrides: [...]}``). Keys of one rule:

- ``match`` (required): which layers. A glob on the dotted module name (``stage2.*``,
  ``*.conv1``); ``re:`` then a regular expression (full match); ``type:Conv2d`` /
  ``type:Linear`` (any module class name, base classes included). A name pattern selects a
  layer when it matches the layer's own name or the name of a module that contains it, so
  ``stage2`` selects every layer inside the block ``stage2``.
- ``w_bits`` / ``a_bits``: the layer's weight / input bits (1-16, 1.58 = ternary weights, or
  32 = not quantized); ``bits`` sets both.
- ``float: true``: keep the layer in full precision (weight and input at 32 bits). This is
  also how a layer qexp cannot wrap (e.g. an nn.Conv1d) is allowed in a model.
- ``quantizer``: options of the layer's quantizers, e.g. ``{per_channel: false}`` for both
  roles or ``{weight: {scale_method: max_abs}}`` for one; an entry with a ``_target_``
  replaces that role's quantizer instead of changing its options.

Embeddings and products (transformers): with ``layers.embed_bits`` set every nn.Embedding is a
row (role ``embed``, its table at those bits, its token-id input never quantized), and a rule
that selects embeddings alone reaches them (``{match: pos_embed, float: true}``, ``{match:
type:Embedding, w_bits: 4}``; table bits or float only, 2-16 or 32: the per-row absmax grid
has no options); a rule that also selects conv/linear layers (``*``, a block above an
embedding) leaves the embeddings alone. With
``layers.matmul_bits`` set every activation-activation product (qexp.models.layers.MatMul) is
a row (role ``product``) shown in the table; its bits are ``layers.matmul_bits`` alone, and no
rule selects it.

A rule changes bits and options, not the role: an edge layer (first/last) keeps the edge
quantizer and plain STE. Bits set by a rule are fixed: a learned-precision quantizer (DQ) of
such a layer keeps exactly those bits, and memory budgets count them as they are.

:func:`resolve_plan` turns the rules into a :class:`LayerPlan`, one row per layer, which is
what the network is built from and what every report reads.
"""

from __future__ import annotations

import difflib
import fnmatch
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from torch import nn

from qexp.bitwidth import BITS_ALLOWED, as_bits, bits_label, valid_bits
from qexp.errors import QexpError

#: the config key the rules live under (for messages)
KEY = "layers.overrides"
RULE_KEYS = ("match", "bits", "w_bits", "a_bits", "float", "quantizer")
ROLES = ("weight", "activation")
FLOAT_BITS = 32
#: plan roles of the layers beside the conv/linear ones: embedding tables and products
SIDE_ROLES = ("embed", "product")
#: bits a per-row / per-token absmax grid takes (it needs a zero level and one each side)
SIDE_BITS = "2-16, or 32 for full precision"
#: how many layer names an error message lists before shortening
_MAX_NAMES = 12


# -- rules -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LayerRule:
    """One entry of ``layers.overrides`` (see the module docstring for the keys).

    ``w_bits`` / ``a_bits`` are None where the rule leaves them alone; ``quantizer`` is
    normalised to ``{"weight": {...}, "activation": {...}}`` (roles it leaves alone absent).
    """

    match: str
    index: int = 0
    w_bits: float | None = None  # an int, or 1.58 (ternary)
    a_bits: float | None = None
    keep_float: bool = False
    quantizer: dict[str, dict[str, Any]] = field(default_factory=dict, hash=False)

    @property
    def label(self) -> str:
        """``overrides[i]``: how tables and messages name the rule."""
        return f"overrides[{self.index}]"

    def matches(self, name: str, module: nn.Module) -> bool:
        """Whether this rule selects the layer ``name`` (``module``)."""
        if self.match.startswith("type:"):
            wanted = self.match[len("type:") :]
            return wanted in _type_names(module)
        scopes = _scopes(name)
        if self.match.startswith("re:"):
            pattern = re.compile(self.match[len("re:") :])
            return any(pattern.fullmatch(s) for s in scopes)
        return any(fnmatch.fnmatchcase(s, self.match) for s in scopes)


def _scopes(name: str) -> list[str]:
    """``a.b.c`` -> ``[a.b.c, a.b, a]``: the layer and the modules that contain it."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(len(parts), 0, -1)]


def _type_names(module: nn.Module) -> set[str]:
    """Class names a ``type:`` rule may use for ``module`` (its class and its bases; a
    quantized layer answers to the float class it replaced)."""
    return {c.__name__ for c in type(module).__mro__ if c not in (nn.Module, object)}


def _fail(where: str, what: str) -> None:
    raise QexpError(f"{KEY}{where}: {what}")


def _bits(where: str, key: str, value: Any) -> float:
    if not valid_bits(value):
        _fail(where, f"{key}={value!r} is not allowed: use {BITS_ALLOWED}")
    return as_bits(value)


def _plain(value: Any) -> Any:
    """Plain Python containers (the composition root hands over resolved dicts and lists;
    any other mapping or sequence is copied into one)."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _quantizer_options(where: str, value: Any) -> dict[str, dict[str, Any]]:
    """``{weight: {...}, activation: {...}}`` from a rule's ``quantizer`` entry."""
    if not isinstance(value, Mapping) or not value:
        _fail(where, f"quantizer={value!r} is not allowed: use a mapping of quantizer options")
    keys = set(value)
    per_role = keys & set(ROLES)
    if per_role and per_role != keys:
        _fail(
            where,
            "quantizer: give either options for both roles ({per_channel: false}) or per role "
            f"({{weight: {{...}}, activation: {{...}}}}), not both (got {sorted(keys)})",
        )
    if not per_role:
        return {role: dict(value) for role in ROLES}
    out = {}
    for role in per_role:
        if not isinstance(value[role], Mapping):
            _fail(where, f"quantizer.{role}={value[role]!r} is not allowed: use a mapping")
        out[role] = dict(value[role])
    return out


def parse_rule(item: Any, index: int) -> LayerRule:
    """One rule from a mapping; a bad key or value raises a one-line QexpError."""
    where = f"[{index}]"
    item = _plain(item)
    if not isinstance(item, Mapping):
        _fail(where, f"each rule is a mapping such as {{match: stage2, w_bits: 2}}, got {item!r}")
    unknown = [k for k in item if k not in RULE_KEYS]
    if unknown:
        close = difflib.get_close_matches(str(unknown[0]), RULE_KEYS, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        _fail(where, f"unknown key {unknown[0]!r}{hint}: use {', '.join(RULE_KEYS)}")
    match = item.get("match")
    if not isinstance(match, str) or not match.strip():
        _fail(where, "every rule needs match: a glob, re:REGEX or type:CLASS")
    match = match.strip()
    if match.startswith("re:"):
        try:
            re.compile(match[len("re:") :])
        except re.error as exc:
            _fail(where, f"match {match!r} is not a valid regular expression ({exc})")
    if match.startswith("type:") and not match[len("type:") :].strip():
        _fail(where, "match 'type:' needs a class name, e.g. type:Conv2d")
    w_bits = a_bits = None
    if "bits" in item:
        w_bits = a_bits = _bits(where, "bits", item["bits"])
    if "w_bits" in item:
        w_bits = _bits(where, "w_bits", item["w_bits"])
    if "a_bits" in item:
        a_bits = _bits(where, "a_bits", item["a_bits"])
    keep_float = item.get("float", False)
    if not isinstance(keep_float, bool):
        _fail(where, f"float={keep_float!r} is not allowed: use true or false")
    quantizer = _quantizer_options(where, item["quantizer"]) if "quantizer" in item else {}
    if keep_float and (w_bits is not None or a_bits is not None or quantizer):
        _fail(where, "float: true keeps the layer unquantized: drop its bits/quantizer keys")
    if not keep_float and w_bits is None and a_bits is None and not quantizer:
        _fail(
            where, f"rule for {match!r} sets nothing: give bits, w_bits, a_bits, float or quantizer"
        )
    return LayerRule(match, index, w_bits, a_bits, keep_float, quantizer)


def parse_rules(items: Any) -> list[LayerRule]:
    """The rules of ``layers.overrides`` (None or an empty list: no rules).

    ``items`` is what the config holds: a list of mappings (OmegaConf nodes are accepted).
    """
    items = _plain(items)
    if items is None:
        return []
    if isinstance(items, Mapping) or not isinstance(items, Sequence) or isinstance(items, str):
        raise QexpError(
            f"{KEY} must be a list of rules, e.g. '{KEY}=[{{match: stage2, w_bits: 2}}]', "
            f"got {items!r}"
        )
    return [parse_rule(item, i) for i, item in enumerate(items)]


# -- the plan ------------------------------------------------------------------------------------
#: layer classes qexp wraps (exact classes: a subclass may compute something else)
WRAPPABLE = (nn.Conv2d, nn.Linear)
#: layer families with weights that qexp recognises but cannot wrap
_WEIGHT_LAYERS = (nn.modules.conv._ConvNd, nn.Linear, nn.Bilinear)


def is_wrappable(module: nn.Module) -> bool:
    """Whether qexp can quantize ``module`` (an nn.Conv2d or nn.Linear, or already wrapped;
    a quantized embedding is a table, not one of these)."""
    from qexp.quant.layers import QEmbedding, QuantLayer

    if isinstance(module, QEmbedding):
        return False
    return type(module) in WRAPPABLE or isinstance(module, QuantLayer)


def is_weight_layer(module: nn.Module) -> bool:
    """Whether ``module`` is a conv or linear layer (wrappable or not)."""
    return is_wrappable(module) or isinstance(module, _WEIGHT_LAYERS)


def is_embedding(module: nn.Module) -> bool:
    """Whether ``module`` is an nn.Embedding (that exact class) or a quantized one."""
    from qexp.quant.layers import QEmbedding

    return type(module) is nn.Embedding or isinstance(module, QEmbedding)


def is_product(module: nn.Module) -> bool:
    """Whether ``module`` is an activation-activation product qexp quantizes (a module that
    declares ``quantizable_product``, e.g. qexp.models.layers.MatMul) or a quantized one."""
    from qexp.quant.layers import QMatMul

    return bool(getattr(module, "quantizable_product", False)) or isinstance(module, QMatMul)


def kind_of(module: nn.Module) -> str:
    """The float class name of a layer (``Conv2d`` for a quantized QConv2d, ``Embedding`` for
    a QEmbedding, ``MatMul`` for a product)."""
    if is_product(module):
        return "MatMul"
    for cls in type(module).__mro__:
        if cls in (*WRAPPABLE, nn.Embedding):
            return cls.__name__
    return type(module).__name__


@dataclass(frozen=True)
class PlanRow:
    """How one layer is built.

    Attributes:
        name: dotted module name.
        kind: float class name (``Conv2d``, ``Linear``, ``Embedding``, ``MatMul``,
            ``Conv1d``...).
        role: ``first`` / ``last`` (edge quantizer, STE) or ``body`` (the run's quantizer and
            estimator), from the first/last policy; ``embed`` (an embedding table, per-row
            absmax, STE) or ``product`` (both inputs of an activation product, per-token
            absmax, STE).
        w_bits / a_bits: weight / input bits (32 = not quantized); an embedding's input
            (token ids) is never quantized; a product's two inputs are both at ``a_bits``.
        params: number of weights.
        quantizer: per-role quantizer options set by rules (``{"weight": {...}}``).
        rules: indices of the rules that touched the layer, in order.
        w_fixed / a_fixed: whether a rule set the weight / input bits (then they are not
            learned, whatever the quantizer).
        wrappable: False for a layer qexp cannot wrap, allowed only when kept in float.
    """

    name: str
    kind: str
    role: str
    w_bits: float  # an int, or 1.58 (ternary)
    a_bits: float
    params: int
    quantizer: dict[str, dict[str, Any]] = field(default_factory=dict, hash=False)
    rules: tuple[int, ...] = ()
    w_fixed: bool = False
    a_fixed: bool = False
    wrappable: bool = True

    @property
    def keep_float(self) -> bool:
        """Neither weight nor input is quantized."""
        return self.w_bits >= FLOAT_BITS and self.a_bits >= FLOAT_BITS

    @property
    def set_by(self) -> str:
        """Which rules set this row (``-``: the first/last policy and the run's bits)."""
        return ", ".join(f"overrides[{i}]" for i in self.rules) or "-"

    def to_json(self) -> dict[str, Any]:
        """The row as metrics.json stores it."""
        return {
            "name": self.name,
            "kind": self.kind,
            "role": self.role,
            "w_bits": self.w_bits,
            "a_bits": self.a_bits,
            "float": self.keep_float,
            "params": self.params,
            "quantizer": self.quantizer,
            "rules": list(self.rules),
            "set_by": self.set_by,
        }


@dataclass(frozen=True)
class LayerPlan:
    """The resolved per-layer settings of a network, in registration order."""

    rows: tuple[PlanRow, ...]
    rules: tuple[LayerRule, ...] = ()

    def __iter__(self):
        return iter(self.rows)

    def __len__(self) -> int:
        return len(self.rows)

    def row(self, name: str) -> PlanRow:
        """The row of layer ``name`` (KeyError if there is none)."""
        for r in self.rows:
            if r.name == name:
                return r
        raise KeyError(name)

    @property
    def wrapped(self) -> list[PlanRow]:
        """Rows of the conv/linear layers that become qexp quantized layers (wrappable
        ones)."""
        return [r for r in self.rows if r.wrappable and r.role not in SIDE_ROLES]

    @property
    def embeddings(self) -> list[PlanRow]:
        """Rows of the embedding tables (``layers.embed_bits``), float ones included."""
        return [r for r in self.rows if r.role == "embed"]

    @property
    def products(self) -> list[PlanRow]:
        """Rows of the activation-activation products (``layers.matmul_bits``)."""
        return [r for r in self.rows if r.role == "product"]

    def to_json(self) -> list[dict[str, Any]]:
        """Every row as a plain dict (for metrics.json and ``--cfg job``)."""
        return [r.to_json() for r in self.rows]

    def annotate(self, table: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Add ``float``, ``quantizer`` and ``set_by`` of each layer's row to the per-layer
        dicts of ``table`` (e.g. qexp.train.inspect_levels.layer_table's), matched by
        ``name``; returns ``table``."""
        by_name = {r.name: r for r in self.rows}
        for entry in table:
            row = by_name.get(entry.get("name"))
            if row is not None:
                entry.update(float=row.keep_float, quantizer=row.quantizer, set_by=row.set_by)
        return table


def _name_list(names: Sequence[str]) -> str:
    if len(names) <= _MAX_NAMES:
        return ", ".join(names)
    head = ", ".join(names[: _MAX_NAMES - 2])
    return f"{head}, ... ({len(names) - _MAX_NAMES + 1} more), {names[-1]}"


def _unmatched(rule: LayerRule, layers: list[tuple[str, nn.Module]]) -> QexpError:
    if rule.match.startswith("type:"):
        kinds = sorted({kind_of(m) for _, m in layers})
        avail = f"the layer types are {', '.join(kinds)}"
    else:
        avail = f"the layers are {_name_list([n for n, _ in layers])}"
    return QexpError(f"{KEY}[{rule.index}]: match {rule.match!r} selects no layer; {avail}")


def _base_row(
    name: str, module: nn.Module, index: int, count: int, body_bits: Any, first: Any, last: Any
) -> PlanRow:
    """The row the first/last policy gives (as qexp.quant.wrap always built it)."""
    role = "first" if index == 0 else "last" if index == count - 1 else "body"
    edge_bits = first if role == "first" else last if role == "last" else None
    if edge_bits is not None:
        w_bits = a_bits = int(edge_bits)
    else:
        role = "body"
        w_bits, a_bits = as_bits(body_bits.w_bits), as_bits(body_bits.a_bits)
    return PlanRow(name, kind_of(module), role, w_bits, a_bits, module.weight.numel())


def _apply(row: PlanRow, rule: LayerRule) -> PlanRow:
    changes: dict[str, Any] = {"rules": (*row.rules, rule.index)}
    if rule.keep_float:
        changes.update(
            w_bits=FLOAT_BITS, a_bits=FLOAT_BITS, w_fixed=True, a_fixed=True, quantizer={}
        )
    if rule.w_bits is not None:
        changes.update(w_bits=rule.w_bits, w_fixed=True)
    if rule.a_bits is not None:
        changes.update(a_bits=rule.a_bits, a_fixed=True)
    if rule.quantizer:
        merged = {role: dict(opts) for role, opts in row.quantizer.items()}
        for role, opts in rule.quantizer.items():
            # an entry with _target_ replaces the role's quantizer: earlier options are void
            merged[role] = dict(opts) if "_target_" in opts else {**merged.get(role, {}), **opts}
        changes["quantizer"] = merged
    return replace(row, **changes)


def _side_bits_ok(value: Any) -> bool:
    """Whether an absmax grid (embedding table, product input) can take ``value`` bits."""
    is_int = isinstance(value, int) and not isinstance(value, bool)
    return is_int and (2 <= value <= 16 or value == FLOAT_BITS)


def _side_bits(key: str, value: Any) -> int:
    """``layers.embed_bits`` / ``layers.matmul_bits``: an int the absmax grid can take."""
    if not _side_bits_ok(value):
        raise QexpError(f"{key}={value!r} is not allowed: use {SIDE_BITS}")
    return int(value)


def side_rows(net: nn.Module, embed_bits: Any, matmul_bits: Any) -> dict[str, PlanRow]:
    """Rows of the embeddings (``embed_bits`` set) and products (``matmul_bits`` set)."""
    rows = {}
    embed = None if embed_bits is None else _side_bits("layers.embed_bits", embed_bits)
    product = None if matmul_bits is None else _side_bits("layers.matmul_bits", matmul_bits)
    for name, module in net.named_modules():
        if embed is not None and is_embedding(module):
            rows[name] = PlanRow(
                name, "Embedding", "embed", embed, FLOAT_BITS, module.weight.numel()
            )
        elif product is not None and product < FLOAT_BITS and is_product(module):
            rows[name] = PlanRow(name, "MatMul", "product", FLOAT_BITS, product, 0)
    return rows


def _apply_to_embedding(row: PlanRow, rule: LayerRule) -> PlanRow:
    """A rule on an embedding: its table's bits or float (its token-id input stays float)."""
    if rule.quantizer:
        _fail(
            f"[{rule.index}]",
            f"match {rule.match!r} selects the embedding {row.name}, whose per-row absmax "
            "grid takes no quantizer options: give it bits or float only",
        )
    if rule.w_bits is None and not rule.keep_float:
        _fail(f"[{rule.index}]", f"match {rule.match!r} selects the embedding {row.name} and "
              "sets only input bits, but its input is token ids: give its table bits (w_bits "
              "or bits) or float: true")  # fmt: skip
    if rule.w_bits is not None and not _side_bits_ok(rule.w_bits):
        _fail(f"[{rule.index}]", f"the embedding {row.name} cannot take {rule.w_bits} bits: "
              f"an embedding table (per-row absmax) takes {SIDE_BITS}")  # fmt: skip
    changed = _apply(row, replace(rule, a_bits=None))
    return replace(changed, a_bits=FLOAT_BITS, a_fixed=False)


def resolve_plan(
    net: nn.Module,
    rules: Iterable[LayerRule] | Any,
    body_bits: Any,
    first_bits: int | None,
    last_bits: int | None,
    embed_bits: int | None = None,
    matmul_bits: int | None = None,
) -> LayerPlan:
    """The per-layer settings of ``net``: the first/last policy, then ``rules`` in order.

    Args:
        net: the float network (or an already quantized one).
        rules: parsed rules, or the raw ``layers.overrides`` list (parsed here; None = none).
        body_bits: the run's bits, an object with ``w_bits`` and ``a_bits``
            (qexp.quant.wrap.LayerBits).
        first_bits / last_bits: bits of the first / last wrappable layer (None: the run's bits,
            as a body layer).
        embed_bits: bits of every embedding table (None: embeddings stay float, outside the
            plan); rules may change single tables.
        matmul_bits: bits of both inputs of every activation product (None or 32: float
            products, outside the plan); rules never select products.

    Raises QexpError (one line) when a rule selects no layer (naming the layers there are),
    when the network has no layer qexp can quantize, or when it has a conv/linear layer qexp
    cannot wrap that the rules do not keep in float.
    """
    rules = _plain(rules)
    if rules is not None and (isinstance(rules, str | Mapping) or not isinstance(rules, Iterable)):
        parse_rules(rules)  # raises its one-line message
    items = [] if rules is None else list(rules)
    parsed = all(isinstance(r, LayerRule) for r in items)
    rule_list = items if parsed else parse_rules(items)
    weight_layers = [(n, m) for n, m in net.named_modules() if n and is_weight_layer(m)]
    wrappable = [(n, m) for n, m in weight_layers if is_wrappable(m)]
    index = {n: i for i, (n, _) in enumerate(wrappable)}
    rows: dict[str, PlanRow] = {}
    side = side_rows(net, embed_bits, matmul_bits)
    for name, module in net.named_modules():
        if name in side:
            rows[name] = side[name]
        elif not name or not is_weight_layer(module):
            continue
        elif name in index:
            rows[name] = _base_row(
                name, module, index[name], len(wrappable), body_bits, first_bits, last_bits
            )
        else:  # qexp cannot wrap it: allowed only if the rules keep it in float
            weight = getattr(module, "weight", None)
            lazy = weight is None or nn.parameter.is_lazy(weight)  # e.g. nn.LazyLinear
            params = 0 if lazy else weight.numel()
            rows[name] = PlanRow(
                name, kind_of(module), "-", FLOAT_BITS, FLOAT_BITS, params, wrappable=False
            )
    modules = dict(net.named_modules())
    selectable = [(n, modules[n]) for n, r in rows.items() if r.role != "product"]
    for rule in rule_list:
        hit = [n for n, m in selectable if rule.matches(n, m)]
        if not hit:
            raise _unmatched(rule, selectable)
        if not all(rows[n].role == "embed" for n in hit):
            # a rule that also selects conv/linear layers (``*``, a scope above an embedding)
            # leaves embeddings alone, as before they were rows: a table changes only by a
            # rule that selects embeddings alone (``type:Embedding``, their names)
            hit = [n for n in hit if rows[n].role != "embed"]
        for n in hit:
            row = rows[n]
            rows[n] = _apply_to_embedding(row, rule) if row.role == "embed" else _apply(row, rule)
    for n, row in rows.items():
        if not row.wrappable and not (row.rules and row.keep_float):
            raise _unwrappable(n, modules[n], row.rules[-1] if row.rules else None)
    if not wrappable:
        raise QexpError(
            f"model {type(net).__name__} has no nn.Conv2d or nn.Linear layer: qexp quantizes "
            "exactly those (use a model built from them)"
        )
    return LayerPlan(tuple(rows.values()), tuple(rule_list))


def _class_name(module: nn.Module) -> str:
    """``Conv1d`` for torch's own classes, the full dotted name for others (a subclass of
    nn.Linear from another package is not the nn.Linear qexp wraps)."""
    cls = type(module)
    if cls.__module__.startswith("torch.nn"):
        return cls.__name__
    return f"{cls.__module__}.{cls.__qualname__}"


def _unwrappable(name: str, module: nn.Module, rule: int | None) -> QexpError:
    by = f" ({KEY}[{rule}] quantizes it)" if rule is not None else ""
    return QexpError(
        f"layer {name} is a {_class_name(module)}, which qexp cannot quantize{by}: qexp wraps "
        f"exactly nn.Conv2d and nn.Linear; keep it in float with "
        f"'{KEY}=[{{match: {name}, float: true}}]' or build the model from those layers"
    )


# -- quantizer options ---------------------------------------------------------------------------
def layer_quantizer_spec(node: Any, role: str, options: Mapping[str, Any] | None) -> Any:
    """The ``_target_`` node of ``role``'s quantizer for a layer with rule ``options``.

    ``node`` is a quantizer group node (with ``weight`` / ``activation`` entries) or a single
    ``_target_`` node for both roles, as qexp.train.build.quantizer_factory reads it. Options
    are merged over the role's node; options with a ``_target_`` replace it.
    """
    spec = _plain(node)
    spec = spec.get(role, spec) if isinstance(spec, Mapping) else spec
    spec = _plain(spec)
    if not options:
        return spec
    if "_target_" in options:
        return dict(options)
    return {**spec, **options}


# -- the preflight table -----------------------------------------------------------------------
def _bits_text(bits: float) -> str:
    return bits_label(bits)


def _options_text(row: PlanRow) -> str:
    parts = []
    for role in ROLES:
        opts = row.quantizer.get(role)
        if opts:
            inner = ", ".join(f"{k}={v}" for k, v in opts.items())
            parts.append(f"{role[0]}: {inner}")
    return "; ".join(parts) or "-"


def format_plan(plan: LayerPlan) -> str:
    """The plan as a plain-text table, one line per layer (for the ``qexp train`` preflight).

    Columns: layer, type, role, weight bits, input bits, params, quantizer options set by
    rules, and which rules set the row (``-``: the first/last policy and the run's bits).
    """
    header = ("layer", "type", "role", "w_bits", "a_bits", "params", "quantizer", "set by")
    lines = [
        (
            r.name,
            r.kind,
            r.role,
            _bits_text(r.w_bits),
            _bits_text(r.a_bits),
            str(r.params),
            _options_text(r),
            r.set_by,
        )
        for r in plan.rows
    ]
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
    right = {3, 4, 5}

    def fmt(cells: Sequence[str]) -> str:
        out = [
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return "  ".join(out).rstrip()

    return "\n".join([fmt(header), fmt(["-" * w for w in widths]), *(fmt(ln) for ln in lines)])
