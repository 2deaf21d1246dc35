"""Straight-through estimator: forward q(x), backward dL/dx = dL/dq(x)."""

from __future__ import annotations

from qexp.estimators.base import Estimator


class STE(Estimator):
    """Plain STE for weights and activations (the base class's behaviour)."""

