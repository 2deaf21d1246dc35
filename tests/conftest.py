"""Shared helpers: run the `qexp` CLI in a subprocess, read run outputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import DictConfig

#: fast, deterministic settings for a run on the bundled digits set: the one list every test
#: that trains, composes or sweeps a digits run starts from (``[*FAST, ...]``)
FAST = ["dataset=digits", "trainer.threads=1", "trainer.progress=none", "trainer.histograms=false"]


def qexp_cmd(*args: str) -> list[str]:
    """Command line of `qexp ARGS` through the current interpreter."""
    return [sys.executable, "-m", "qexp.cli", *args]


def run_qexp(*args: str, cwd: Path, check: bool = True, timeout: float = 300, env=None):
    """Run `qexp ARGS` in ``cwd``; returns the CompletedProcess (text output)."""
    full_env = {**os.environ, "HYDRA_FULL_ERROR": "0", **(env or {})}
    proc = subprocess.run(
        qexp_cmd(*args), cwd=cwd, capture_output=True, text=True, timeout=timeout, env=full_env
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"qexp {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def read_metrics(run_dir: Path) -> dict:
    """metrics.json of a run dir."""
    return json.loads((Path(run_dir) / "metrics.json").read_text())


def compose_config(*overrides: str, with_hydra: bool = False) -> DictConfig:
    """The composed run config of `qexp train OVERRIDES` (Hydra's compose API, no run dir);
    ``with_hydra`` keeps the ``hydra`` node (launcher, sweeper, dirs)."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    from qexp.config.schema import register_schemas

    register_schemas()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module(config_module="qexp.conf", version_base=None):
            return compose("config", list(overrides), return_hydra_config=with_hydra)
    finally:
        GlobalHydra.instance().clear()


@pytest.fixture
def cfg_train():
    """Compose a quick digits run config: ``cfg_train("estimator=aqe", "bits=2")``."""
    return lambda *overrides: compose_config(*FAST, *overrides)


def hparams_backend(logdir: Path) -> dict:
    """What TensorBoard's HParams tab receives for ``logdir``: its own backend, in process.

    Returns ``{"experiment": ..., "sessions": {run: session}}`` (the JSON of the plugin's
    ``/experiment`` and ``/session_groups`` routes; each session with its group's hparams).
    """
    from tensorboard.backend.event_processing import data_provider
    from tensorboard.backend.event_processing import plugin_event_multiplexer as pem
    from tensorboard.plugins import base_plugin
    from tensorboard.plugins.hparams import hparams_plugin
    from tensorboard.plugins.scalar import scalars_plugin
    from werkzeug.test import Client
    from werkzeug.wrappers import Response

    mux = pem.EventMultiplexer()
    mux.AddRunsFromDirectory(str(logdir))
    mux.Reload()
    plugins: dict = {}
    ctx = base_plugin.TBContext(
        logdir=str(logdir),
        multiplexer=mux,
        data_provider=data_provider.MultiplexerDataProvider(mux, str(logdir)),
        plugin_name_to_instance=plugins,
    )
    plugins["scalars"] = scalars_plugin.ScalarsPlugin(ctx)
    apps = hparams_plugin.HParamsPlugin(ctx).get_plugin_apps()

    def post(route: str, body: dict) -> dict:
        resp = Client(apps[route], Response).post(
            route, data=json.dumps(body), content_type="application/json"
        )
        assert resp.status_code == 200, resp.get_data(as_text=True)
        return json.loads(resp.get_data(as_text=True))

    experiment = post("/experiment", {"experimentName": ""})
    statuses = ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE", "STATUS_RUNNING"]
    groups = post(
        "/session_groups",
        {"experimentName": "", "allowedStatuses": statuses, "colParams": [],
         "startIndex": 0, "sliceSize": 1000},
    )  # fmt: skip
    sessions = {
        s["name"]: {**s, "hparams": g["hparams"]}
        for g in groups.get("sessionGroups", [])
        for s in g["sessions"]
    }
    return {"experiment": experiment, "sessions": sessions}
