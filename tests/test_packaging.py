"""The installed package ships every subpackage and the YAML config tree."""

from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

ROOT = Path(__file__).resolve().parents[1]


def test_every_subpackage_is_listed_for_installation():
    setup = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(setup["packages"])
    found = {
        ".".join(p.parent.relative_to(ROOT).parts)
        for p in (ROOT / "qexp").rglob("__init__.py")
    }
    assert found - {"qexp.conf"} <= listed, f"missing from pyproject packages: {found - listed}"
    assert setup["package-dir"]["qexp.conf"] == "conf"
    assert "**/*.yaml" in setup["package-data"]["qexp.conf"]


def test_config_tree_is_importable_as_package_data():
    import importlib.resources

    root = importlib.resources.files("qexp.conf")
    assert root.joinpath("config.yaml").is_file()
    for group in ("model", "dataset", "quantizer", "estimator", "schedule", "trainer"):
        assert any(p.name.endswith(".yaml") for p in root.joinpath(group).iterdir()), group
