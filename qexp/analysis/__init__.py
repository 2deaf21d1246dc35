"""Analyses of trained runs: per-layer sensitivity to bit width (qexp sensitivity)."""
