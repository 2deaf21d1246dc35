"""Groups arranged for a figure: panels per (dataset, model), lines per estimator, points on
an :class:`~qexp.report.axes.Axis`, and the full-precision reference of each panel."""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from qexp.report.axes import AXES, Axis
from qexp.report.runs import Group

Panel = tuple[str, str]
Points = tuple[list[float], list[float], list[float]]


def as_axis(x: Axis | str) -> Axis:
    """An axis from its key (ValueError naming the choices for an unknown one)."""
    if isinstance(x, Axis):
        return x
    if x not in AXES:
        raise ValueError(f"x must be one of {', '.join(AXES)}, not {x!r}")
    return AXES[x]


def panels(groups: list[Group]) -> dict[Panel, list[Group]]:
    """panel (dataset, model) -> its groups, in the groups' order."""
    out: dict[Panel, list[Group]] = {}
    for g in groups:
        out.setdefault((str(g.dataset), str(g.model)), []).append(g)
    return out


def _many_quantizers(groups: list[Group]) -> bool:
    return len({g.quantizer for g in groups}) > 1


def _method_name(g: Group, many_quantizers: bool) -> str:
    return f"{g.quantizer}/{g.estimator}" if many_quantizers else str(g.estimator)


def _series_name(g: Group, many_quantizers: bool) -> str:
    """Line label: estimator (+ quantizer, + extra settings, + activation bits if not = w)."""
    name = _method_name(g, many_quantizers)
    if g.extras:
        name += " (" + ", ".join(f"{k}={v}" for k, v in g.extras.items()) + ")"
    if g.a_bits != g.w_bits and not g.full_precision:
        name += f" a{g.a_bits}"
    return name


def series(groups: list[Group]) -> dict[Panel, dict[str, list[Group]]]:
    """panel (dataset, model) -> line name -> groups sorted by w_bits."""
    many = _many_quantizers(groups)
    out: dict[Panel, dict[str, list[Group]]] = {}
    for panel, members in panels(groups).items():
        lines: dict[str, list[Group]] = {}
        for g in members:
            lines.setdefault(_series_name(g, many), []).append(g)
        out[panel] = {k: sorted(v, key=lambda g: g.w_bits) for k, v in lines.items()}
    return out


def line_groups(groups: list[Group], x: Axis | str) -> dict[Panel, dict[str, list[Group]]]:
    """panel -> line name -> the quantized groups placed on the axis, sorted along it.

    On a cost axis one line per estimator + quantizer (groups that differ in anything else,
    e.g. a budget, are points of the same line) and groups without a value are left out;
    otherwise one line per :func:`series` line. Full-precision groups are never points (they
    are the reference line); lines without points are left out.
    """
    ax = as_axis(x)
    many = _many_quantizers(groups)
    out: dict[Panel, dict[str, list[Group]]] = {}
    if not ax.cost:
        for panel, named in series(groups).items():
            out[panel] = {
                name: sorted(kept, key=lambda g: ax.value(g))
                for name, gs in named.items()
                if (kept := [g for g in gs if not g.full_precision])
            }
        return out
    for panel, members in panels(groups).items():
        by_line: dict[str, list[Group]] = {}
        for g in members:
            if g.full_precision or ax.value(g) is None:
                continue
            by_line.setdefault(_method_name(g, many), []).append(g)
        out[panel] = {k: sorted(v, key=lambda g: ax.value(g)) for k, v in by_line.items()}
    return out


def plot_series(groups: list[Group], x: Axis | str = "bits") -> dict[Panel, dict[str, Points]]:
    """What the figure draws: panel (dataset, model) -> line name -> (xs, ys, yerrs).

    xs are the groups' places on the axis (``"bits"``: w_bits; ``"weight_kb"`` / ``"bops"``:
    the group's mean weight_kb / bops), ys their metric's mean, yerrs its sample std over
    seeds; the lines are those of :func:`line_groups`.
    """
    ax = as_axis(x)
    out: dict[Panel, dict[str, Points]] = {}
    for panel, named in line_groups(groups, ax).items():
        out[panel] = {
            name: ([ax.value(g) for g in gs], [g.mean for g in gs], [g.std for g in gs])
            for name, gs in named.items()
        }
    return out


@dataclass(frozen=True)
class Reference:
    """All full-precision runs of a panel (any estimator) pooled."""

    mean: float
    std: float  # sample std; 0 for one run
    n: int
    low: float
    high: float


def reference(members: list[Group]) -> Reference | None:
    """The full-precision reference of a panel's groups, or None without such runs."""
    values = [v for g in members if g.full_precision for v in g.values]
    if not values:
        return None
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return Reference(statistics.fmean(values), std, len(values), min(values), max(values))


def pareto_front(points: list[tuple[float, float]], higher_is_better: bool = True) -> list[int]:
    """Indices of the (cost, metric) points that no other point beats on both (lower or
    equal cost and a better or equal metric, strictly better in one), sorted by cost."""
    sign = 1.0 if higher_is_better else -1.0

    def beaten(c: float, a: float) -> bool:
        return any(
            c2 <= c and sign * a2 >= sign * a and (c2 < c or sign * a2 > sign * a)
            for c2, a2 in points
        )

    front = [i for i, (c, a) in enumerate(points) if not beaten(c, a)]
    return sorted(front, key=lambda i: points[i][0])
