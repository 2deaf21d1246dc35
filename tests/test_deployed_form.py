"""Each estimator declares from which training progress it trains its deployed form, the
point before which a tuner must not prune it."""

from __future__ import annotations

import pytest
from conftest import compose_config

from qexp.config.registry import group_options
from qexp.train.build import build_estimator
from qexp.train.run import run_spec

ESTIMATORS = group_options("estimator")


@pytest.mark.parametrize("name", ESTIMATORS)
def test_final_form_progress_agrees_with_is_final_form(name):
    estimator = build_estimator(run_spec(compose_config(f"estimator={name}")).estimator)
    start = estimator.final_form_progress()
    assert 0.0 <= start <= 1.0
    for k in range(101):
        p = k / 100
        estimator.step(p)
        if p >= start + 0.011:  # after the declared point the trained network is deployed
            assert estimator.is_final_form(), (name, p)


def test_alpha_blending_is_deployed_where_its_ramp_ends():
    est = build_estimator(run_spec(compose_config("estimator=alpha_blend")).estimator)
    p1 = est.alpha_curve.p1
    # within float32 rounding of alpha = 1 (the cubic ramp is flat at its end)
    assert est.final_form_progress() == pytest.approx(p1, abs=5e-3)
    est.step(p1 - 0.05)
    assert not est.is_final_form()


def test_aqe_is_deployed_where_its_sharpness_ends():
    est = build_estimator(run_spec(compose_config("estimator=aqe")).estimator)
    start = est.final_form_progress()
    end = est.beta_curve(1.0) if est.beta_max is None else min(est.beta_curve(1.0), est.beta_max)
    assert est.beta_curve(start) >= end * (1 - 1e-9)
    assert est.beta_curve(max(0.0, start - 0.01)) < end


@pytest.mark.parametrize("p1", [0.6, 0.9])
def test_quantnet_is_deployed_where_its_sharpness_ends(p1):
    """QuantNet's forward is its soft network throughout; it is nearest the deployed one once
    gamma reaches the end of its schedule, so a tuner must not judge it before."""
    config = compose_config("estimator=quantnet", f"schedule.gamma.p1={p1}")
    est = build_estimator(run_spec(config).estimator)
    start = est.final_form_progress()
    end = est.gamma_curve(1.0)
    assert start == pytest.approx(p1, abs=1e-3)
    assert est.gamma_curve(start) >= end * (1 - 1e-9) > est.gamma_curve(start - 0.01)
    fixed = build_estimator(run_spec(compose_config("estimator=quantnet")).estimator)
    fixed.gamma_curve = None  # a constant gamma: deployed (as near as it gets) from the start
    assert fixed.final_form_progress() == 0.0
