"""Schedules: functions of training progress p in [0, 1] (step / total steps).

The LR schedule returns a multiplier of the base LR; estimator curves (alpha, beta, gamma, ...)
return the value itself. All are plain callables built from the ``schedule`` config group, with
no state of their own, so resuming a run only needs the step count.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


class Curve:
    """A value as a function of training progress p in [0, 1]."""

    def __call__(self, p: float) -> float:
        raise NotImplementedError


def reaches(curve: Curve, end: float, resolution: int = 1000) -> float:
    """The first progress k / ``resolution`` at which a growing ``curve`` is at ``end`` (to a
    relative 1e-9); 1.0 if it never is. Where an estimator's sharpness schedule ends, its
    soft stand-in is as close to the deployed network as training takes it."""
    for k in range(resolution + 1):
        if curve(k / resolution) >= end * (1 - 1e-9):
            return k / resolution
    return 1.0


def _window(p: float, p0: float, p1: float) -> float:
    """Position of p inside [p0, p1], clamped to [0, 1]."""
    if p1 <= p0:
        return 1.0 if p >= p1 else 0.0
    return min(max((p - p0) / (p1 - p0), 0.0), 1.0)


class Constant(Curve):
    """The same value throughout."""

    def __init__(self, value: float = 1.0) -> None:
        self.value = value

    def __call__(self, p: float) -> float:
        return self.value


class Ramp(Curve):
    """``start`` before p0, ``end`` from p1 on, and a ``shape`` ramp between.

    ``cubic``: 1 - ((p1 - p) / (p1 - p0))^3, fast at first (qexp's default for alpha-blending);
    ``linear``: (p - p0) / (p1 - p0).
    """

    def __init__(
        self,
        start: float = 0.0,
        end: float = 1.0,
        p0: float = 0.0,
        p1: float = 0.8,
        shape: str = "cubic",
    ) -> None:
        if shape not in ("cubic", "linear"):
            raise ValueError(f"shape must be 'cubic' or 'linear', got {shape!r}")
        self.start, self.end, self.p0, self.p1, self.shape = start, end, p0, p1, shape

    def __call__(self, p: float) -> float:
        t = _window(p, self.p0, self.p1)
        frac = 1.0 - (1.0 - t) ** 3 if self.shape == "cubic" else t
        return self.start + (self.end - self.start) * frac


class Exponential(Curve):
    """Geometric growth from ``start`` (at p0) to ``end`` (at p1), constant outside."""

    def __init__(
        self, start: float = 1.0, end: float = 100.0, p0: float = 0.0, p1: float = 1.0
    ) -> None:
        if start <= 0 or end <= 0:
            raise ValueError("Exponential needs positive start and end values")
        self.start, self.end, self.p0, self.p1 = start, end, p0, p1

    def __call__(self, p: float) -> float:
        t = _window(p, self.p0, self.p1)
        return self.start * (self.end / self.start) ** t


# -- learning-rate multipliers ---------------------------------------------------------------


class _WarmupLR(Curve):
    """Linear warmup over the first ``warmup`` fraction of training, then ``_after``."""

    def __init__(self, warmup: float = 0.0) -> None:
        self.warmup = warmup

    def __call__(self, p: float) -> float:
        if self.warmup > 0 and p < self.warmup:
            return (p + 1e-3) / (self.warmup + 1e-3)
        q = (p - self.warmup) / (1.0 - self.warmup) if self.warmup < 1 else 1.0
        return self._after(min(max(q, 0.0), 1.0))

    def _after(self, q: float) -> float:
        raise NotImplementedError


class CosineLR(_WarmupLR):
    """Cosine decay from 1 to ``final`` after warmup."""

    def __init__(self, warmup: float = 0.0, final: float = 0.0) -> None:
        super().__init__(warmup)
        self.final = final

    def _after(self, q: float) -> float:
        return self.final + (1.0 - self.final) * 0.5 * (1.0 + math.cos(math.pi * q))


class StepLR(_WarmupLR):
    """Multiply by ``gamma`` at each milestone (fractions of training after warmup)."""

    def __init__(
        self, warmup: float = 0.0, milestones: Sequence[float] = (0.5, 0.75), gamma: float = 0.1
    ) -> None:
        super().__init__(warmup)
        self.milestones = sorted(milestones)
        self.gamma = gamma

    def _after(self, q: float) -> float:
        return self.gamma ** sum(q >= m for m in self.milestones)


class ConstantLR(_WarmupLR):
    """Constant LR after warmup."""

    def _after(self, q: float) -> float:
        return 1.0
