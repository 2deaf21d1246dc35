"""Search spaces: every search-space file parses and names knobs the config accepts, and every
value in every range of every estimator's knobs (its own or the common ones) is a valid run."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import compose_config

from qexp.config.registry import group_options
from qexp.config.validate import validate_config
from qexp.errors import QexpError
from qexp.study.space import Knob, knob_overrides, parse_knob, search_space

CONF = Path(__file__).resolve().parents[1] / "conf"
ESTIMATORS = group_options("estimator")
QUANTIZERS = group_options("quantizer")
#: (group, option) of every search-space file qexp ships (a method without one is tuned on the
#: common knobs)
SPACE_FILES = [
    (group, name)
    for group in ("estimator", "quantizer")
    for name in sorted(p.stem for p in (CONF / "search_space" / group).glob("*.yaml"))
]


@pytest.mark.parametrize(("group", "name"), SPACE_FILES)
def test_every_search_space_file_parses_and_names_known_keys(group, name):
    options = ESTIMATORS if group == "estimator" else QUANTIZERS
    assert name in options, f"search_space/{group}/{name}.yaml has no {group}={name}"
    estimator, quantizer = (name, "uniform") if group == "estimator" else ("ste", name)
    if estimator == "block_replace":
        quantizer = "lsq"
    knobs = search_space(estimator, quantizer)
    cfg = compose_config("dataset=digits", f"estimator={estimator}", f"quantizer={quantizer}")
    for knob in knobs:
        for key in (knob.key, *knob.also):
            node = cfg
            for part in key.split("."):
                assert part in node, f"search_space/{group}/{name}.yaml: unknown key {key}"
                node = node[part]


def _ends(knob: Knob) -> list:
    if knob.type == "categorical":
        return list(knob.choices)
    if knob.type == "int":
        return [int(knob.low), int(knob.high)]
    return [knob.low, knob.high]


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_every_end_of_every_range_composes_and_validates(estimator):
    quantizer = "lsq" if estimator == "block_replace" else "uniform"
    knobs = search_space(estimator, quantizer)
    assert any(k.key == "trainer.lr" for k in knobs)  # the common knob
    for end in (0, -1):
        values = {k.key: _ends(k)[end] for k in knobs}
        overrides = knob_overrides(knobs, values)
        cfg = compose_config(
            "dataset=digits", f"estimator={estimator}", f"quantizer={quantizer}", *overrides
        )
        validate_config(cfg)
        for k in knobs:  # the value lands where the knob says (and in its `also` keys)
            for key in (k.key, *k.also):
                node = cfg
                for part in key.split("."):
                    node = node[part]
                assert node == values[k.key]


def test_lsq_adds_its_step_lr_and_a_study_can_add_knobs():
    keys = [k.key for k in search_space("ste", "lsq", {"trainer.batch_size": {
        "type": "int", "low": 32, "high": 128}})]
    assert keys == ["trainer.lr", "trainer.quantizer_lr", "trainer.batch_size"]


@pytest.mark.parametrize(
    "node",
    [{"low": 1, "high": 2}, {"type": "float", "low": 2, "high": 1},
     {"type": "float", "low": 0, "high": 1, "log": True}, {"type": "categorical"}],
)
def test_bad_ranges_are_one_line_errors(node):
    with pytest.raises(QexpError):
        parse_knob("trainer.lr", node)


@pytest.mark.parametrize("preset", sorted(p.stem for p in (CONF / "study").glob("*.yaml")))
def test_presets_load_and_name_existing_options(preset):
    from qexp.study.runs import load_spec

    spec = load_spec(preset)
    for method in spec.methods:
        for override in (*method.overrides, *[o for v in method.at.values() for o in v]):
            group, _, option = override.partition("=")
            if group in ("estimator", "quantizer"):
                assert (CONF / group / f"{option}.yaml").is_file(), override
    assert len(spec.seeds) >= 2


def test_spec_errors_are_one_line(tmp_path):
    from qexp.study.runs import load_spec

    path = tmp_path / "bad.yaml"
    path.write_text("name: x\nsettings: []\nmethods: {}\nseeds: [0, 1]\ntuning: {trials: 1}\n")
    with pytest.raises(QexpError, match="at least one method"):
        load_spec(str(path))
    with pytest.raises(QexpError, match="no study preset"):
        load_spec("no_such_preset")
