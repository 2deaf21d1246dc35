"""The options of qexp's config groups, as Hydra sees them.

A new estimator, quantizer, model, ... is one YAML file in its group (conf/<group>/ or a user's
``--config-dir``); this lists them, so tools and tests iterate over whatever is there instead
of a hand-kept list.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from hydra import initialize_config_module
from hydra.core.global_hydra import GlobalHydra

from qexp.config.schema import register_schemas

#: the package holding qexp's own config tree (conf/)
CONFIG_MODULE = "qexp.conf"


def group_options(group: str, config_dirs: Sequence[str | Path] = ()) -> list[str]:
    """The option names of config group ``group`` (e.g. ``"estimator"``), sorted.

    ``config_dirs``: a user's config dirs (``--config-dir``), whose options join qexp's own, as
    they do when a run is composed. Uses the running Hydra instance where one is initialised
    (inside ``qexp train`` or a compose block), else a temporary one over qexp's config tree.
    """
    register_schemas()
    overrides = []
    if config_dirs:
        paths = ",".join(f"file://{Path(d).resolve()}" for d in config_dirs)
        overrides.append(f"hydra.searchpath=[{paths}]")
    hydra = GlobalHydra.instance()
    if hydra.is_initialized():
        return _list(group, overrides)
    try:
        with initialize_config_module(config_module=CONFIG_MODULE, version_base=None):
            return _list(group, overrides)
    finally:
        GlobalHydra.instance().clear()


def _list(group: str, overrides: list[str]) -> list[str]:
    loader = GlobalHydra.instance().config_loader()
    return sorted(loader.get_group_options(group, config_name="config", overrides=overrides))
