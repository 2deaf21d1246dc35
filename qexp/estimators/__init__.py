"""Gradient estimators: how the training forward and backward pass through quantizers."""

from qexp.estimators.base import Estimator, EstimatorContext, straight_through

__all__ = ["Estimator", "EstimatorContext", "straight_through"]
