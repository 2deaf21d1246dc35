"""The study's composition root: read the study preset and compose each run's config with
Hydra, into typed specs; train each run through the ordinary job lifecycle.

Every run of a study is a normal run dir: ``.hydra/config.yaml`` (the resolved config),
``train.log``, TensorBoard events, checkpoints and ``metrics.json``; it is locked while it
trains and skipped or resumed like any sweep job (qexp.train.job).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf

from qexp.config.schema import register_schemas
from qexp.errors import QexpError
from qexp.spec import RunSpec
from qexp.study.spec import StudySpec, parse_spec, preset_path
from qexp.train.job import JobResult, Policy, run_job
from qexp.train.parts import EpochHook
from qexp.train.run import run_spec, train_run

#: ``hydra.searchpath`` overrides of the user's config dirs (set by :func:`hydra_configs`)
_SEARCHPATH: list[str] = []


@contextlib.contextmanager
def hydra_configs(config_dirs: tuple[Path, ...] = ()) -> Iterator[None]:
    """Hydra's compose API over qexp's config tree for the block, with the user's config
    dirs (``--config-dir``) searched first, as `qexp train --config-dir` does."""
    register_schemas()
    GlobalHydra.instance().clear()
    paths = ",".join(f"file://{Path(d).resolve()}" for d in config_dirs)
    _SEARCHPATH[:] = [f"hydra.searchpath=[{paths}]"] if config_dirs else []
    try:
        with initialize_config_module(config_module="qexp.conf", version_base=None):
            yield
    finally:
        _SEARCHPATH.clear()
        GlobalHydra.instance().clear()


def compose_run(overrides: list[str]) -> RunSpec:
    """The validated spec of ``qexp train OVERRIDES`` (inside :func:`hydra_configs`)."""
    try:
        cfg = compose("config", [*overrides, *_SEARCHPATH])
    except Exception as exc:  # unknown option or key: Hydra's message, one line
        raise QexpError(f"{' '.join(overrides)}: {str(exc).splitlines()[0]}") from None
    return run_spec(cfg)


def load_spec(name_or_path: str, overrides: list[str] | None = None) -> StudySpec:
    """Read a preset or YAML file, apply ``key=value`` overrides, and check it."""
    path = preset_path(name_or_path)
    overrides = list(overrides or [])
    picks = {k: v for k, v in (_pick(o) for o in overrides) if k}
    overrides = [o for o in overrides if not _pick(o)[0]]
    try:
        cfg = OmegaConf.load(path)
        for key, names in picks.items():
            cfg[key] = _subset(cfg, key, names)
        if overrides:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(overrides))
    except QexpError:
        raise
    except Exception as exc:  # YAML or dotlist syntax
        raise QexpError(f"study spec {path}: {str(exc).splitlines()[0]}") from None
    assert isinstance(cfg, DictConfig)
    plain = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(plain, dict)
    return parse_spec(plain)


#: spec keys that a list on the command line narrows to a subset: methods=[ste,aqe]
_PICKABLE = ("methods", "settings")


def _pick(override: str) -> tuple[str | None, list[str]]:
    """(key, names) of a ``methods=[a,b]`` / ``settings=[w1a1]`` override, else (None, [])."""
    key, _, value = override.partition("=")
    value = value.strip()
    if key not in _PICKABLE or not (value.startswith("[") and value.endswith("]")):
        return None, []
    return key, [v.strip() for v in value[1:-1].split(",") if v.strip()]


def _subset(cfg: DictConfig, key: str, names: list[str]) -> Any:
    """The preset's ``methods`` (a mapping) or ``settings`` (a list) narrowed to ``names``."""
    node = cfg.get(key)
    have = list(node.keys()) if key == "methods" else [s.get("key") for s in node or []]
    unknown = [n for n in names if n not in have]
    if unknown or not names:
        raise QexpError(
            f"{key}=[{','.join(names)}]: {'unknown ' + ', '.join(unknown) if unknown else 'empty'}"
            f"; this preset has {', '.join(map(str, have))} (pick a subset, e.g. "
            f"{key}=[{have[0]}])"
        )
    if key == "methods":
        return {n: node[n] for n in names}
    return [s for s in node if s.get("key") in names]


def train_study_run(
    spec: RunSpec,
    run_dir: Path,
    on_epoch: EpochHook | None = None,
    seal_test: bool = False,
    policy: Policy = Policy.AUTO,
) -> JobResult:
    """Train ``spec`` in ``run_dir`` as a job (skipped when completed with this config,
    resumed when cut off).

    ``seal_test``: a tuning run, whose data refuses to hand out the test split and which ends
    without a test. Errors are recorded in ``metrics.json`` (failed, with the reason) and
    re-raised; ``optuna.TrialPruned`` from ``on_epoch`` passes through, recorded as failed with
    the pruning as its reason.
    """
    train = functools.partial(train_run, on_epoch=on_epoch, seal_test=seal_test)
    return run_job(spec, Path(run_dir), train, policy, standalone=True)
