"""The config-group registry lists what Hydra composes, including a user's --config-dir."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import compose_config

from qexp.config.registry import group_options

CONF = Path(__file__).resolve().parents[1] / "conf"


@pytest.mark.parametrize("group", ["estimator", "quantizer", "model", "dataset"])
def test_group_options_are_the_yaml_files_of_the_group(group):
    on_disk = sorted(p.stem for p in (CONF / group).glob("*.yaml"))
    options = group_options(group)
    assert options == on_disk
    compose_config(f"{group}={options[0]}")  # a listed option composes


def test_config_dir_options_join_and_compose(tmp_path):
    (tmp_path / "estimator").mkdir()
    (tmp_path / "estimator" / "toy_ste.yaml").write_text(
        "_target_: qexp.estimators.ste.STE\nname: toy_ste\n"
    )
    assert "toy_ste" not in group_options("estimator")
    options = group_options("estimator", [tmp_path])
    assert options == sorted([*group_options("estimator"), "toy_ste"])


def test_an_unknown_group_has_no_options():
    assert group_options("no_such_group") == []
