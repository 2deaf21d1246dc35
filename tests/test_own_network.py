"""A user's own network from their own package (``model._target_=my_pkg.net.Net`` with
``--config-dir``), layers qexp cannot wrap, block replacement without declared blocks, and
per-layer overrides end to end (layer table, cost report and export agree)."""

from __future__ import annotations

import json
import math
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import FAST, read_metrics, run_qexp
from torch import nn

from qexp.config.schema import LayersConfig
from qexp.errors import QexpError
from qexp.estimators.block_replace import BlockReplace

#: whether the run config has ``layers.overrides`` yet (the composition root reads the plan)
WIRED = "overrides" in getattr(LayersConfig, "__dataclass_fields__", {})
needs_wiring = pytest.mark.skipif(
    not WIRED, reason="layers.overrides is not in the run config schema yet (phase B wiring)"
)

#: a user's package: a small CNN with blocks, one without, and one with a Conv1d
USER_NET = textwrap.dedent(
    """
    import torch
    from torch import nn


    class Net(nn.Module):
        # qexp builds models with num_classes, in_channels and image_size (from the data set)
        def __init__(self, num_classes, in_channels, image_size, width=8):
            super().__init__()
            self.features = nn.Sequential(
                nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU()
            )
            self.body = nn.Sequential(
                nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU()
            )
            self.head = nn.Linear(width, num_classes)

        def forward(self, x):
            x = self.body(self.features(x))
            return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


    class NetWithBlocks(Net):
        def block_names(self):
            return ["features", "body"]


    class SignalNet(nn.Module):
        def __init__(self, num_classes, in_channels, image_size):
            super().__init__()
            self.rows = nn.Conv1d(image_size, 8, 3, padding=1)
            self.head = nn.Linear(8 * image_size, num_classes)

        def forward(self, x):
            rows = self.rows(x[:, 0])  # image rows as channels of a 1-D signal
            return self.head(torch.flatten(rows, 1))
    """
)


def _user_package(tmp_path: Path) -> tuple[Path, Path]:
    """(PYTHONPATH dir holding my_pkg, --config-dir with model/*.yaml)."""
    src = tmp_path / "src"
    (src / "my_pkg").mkdir(parents=True)
    (src / "my_pkg" / "__init__.py").write_text("")
    (src / "my_pkg" / "net.py").write_text(USER_NET)
    conf = tmp_path / "conf" / "model"
    conf.mkdir(parents=True)
    for name, target in (
        ("my_net", "my_pkg.net.Net"),
        ("my_blocks", "my_pkg.net.NetWithBlocks"),
        ("my_signal", "my_pkg.net.SignalNet"),
    ):
        extra = "width: 8\n" if name != "my_signal" else ""
        (conf / f"{name}.yaml").write_text(f"_target_: {target}\nname: {name}\n{extra}")
    return src, conf.parent


def _train(tmp_path: Path, src: Path, conf: Path, *args: str, check: bool = True):
    return run_qexp(
        "train",
        "--config-dir",
        str(conf),
        *FAST,
        "trainer.epochs=1",
        *args,
        cwd=tmp_path,
        check=check,
        env={"PYTHONPATH": str(src), "OMP_NUM_THREADS": "1"},
    )


# -- fast checks (no training) -----------------------------------------------------------------
class _NoBlocks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)


class _WrongBlocks(_NoBlocks):
    def block_names(self):
        return ["conv", "stage9"]


def test_block_replace_says_the_model_declares_no_blocks():
    with pytest.raises(QexpError) as info:
        BlockReplace().check_model(_NoBlocks())
    text = str(info.value)
    assert "model _NoBlocks declares no blocks" in text and "block_names()" in text
    assert "\n" not in text
    with pytest.raises(QexpError, match="names 'stage9', which is not one of its submodules"):
        BlockReplace().check_model(_WrongBlocks())


def test_block_replace_accepts_declared_blocks():
    class WithBlocks(_NoBlocks):
        def block_names(self):
            return ["conv"]

    BlockReplace().check_model(WithBlocks())


# -- end to end --------------------------------------------------------------------------------
@pytest.mark.slow
def test_user_network_from_its_own_package_trains(tmp_path):
    src, conf = _user_package(tmp_path)
    run = tmp_path / "run"
    _train(tmp_path, src, conf, "model=my_net", f"hydra.run.dir={run}")
    metrics = read_metrics(run)
    assert metrics["status"] == "completed" and metrics["model"] == "my_net"
    layers = {r["name"]: r for r in metrics["layers"]}
    assert list(layers) == ["features.0", "body.0", "head"]
    assert [layers[n]["role"] for n in layers] == ["first", "body", "last"]
    assert (layers["body.0"]["w_bits"], layers["head"]["w_bits"]) == (4, 8)
    assert 0.0 <= metrics["test_acc"] <= 1.0


@pytest.mark.slow
def test_user_network_with_a_layer_qexp_cannot_wrap_is_one_line(tmp_path):
    src, conf = _user_package(tmp_path)
    proc = _train(
        tmp_path, src, conf, "model=my_signal", f"hydra.run.dir={tmp_path / 'r'}", check=False
    )
    assert proc.returncode == 2
    err = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(err) == 1, proc.stderr
    assert "layer rows is a Conv1d, which qexp cannot quantize" in err[0]
    assert "Traceback" not in proc.stderr + proc.stdout


@pytest.mark.slow
@needs_wiring
def test_unwrappable_layer_kept_in_float_trains(tmp_path):
    src, conf = _user_package(tmp_path)
    run = tmp_path / "run"
    _train(
        tmp_path,
        src,
        conf,
        "model=my_signal",
        "layers.overrides=[{match: rows, float: true}]",
        f"hydra.run.dir={run}",
    )
    assert [r["name"] for r in read_metrics(run)["layers"]] == ["head"]


@pytest.mark.slow
def test_block_replace_on_user_network(tmp_path):
    src, conf = _user_package(tmp_path)
    args = ["estimator=block_replace", "partner.epochs=1"]
    proc = _train(
        tmp_path, src, conf, "model=my_net", *args, f"hydra.run.dir={tmp_path / 'a'}", check=False
    )
    assert proc.returncode == 2, proc.stderr
    assert "model Net declares no blocks: give it a method block_names()" in proc.stderr
    assert "Traceback" not in proc.stderr
    run = tmp_path / "b"
    _train(
        tmp_path,
        src,
        conf,
        "model=my_blocks",
        *args,
        f"hydra.run.dir={run}",
        check=True,
    )
    assert read_metrics(run)["status"] == "completed"


@pytest.mark.slow
def test_timm_model_trains_when_timm_is_installed(tmp_path):
    pytest.importorskip("timm")
    conf = tmp_path / "conf" / "model"
    conf.mkdir(parents=True)
    (conf / "timm_resnet.yaml").write_text(
        "_target_: qexp.models.timm_model.timm_model\nname: timm_resnet\nmodel_name: resnet10t\n"
    )
    run = tmp_path / "run"
    run_qexp(
        "train",
        "--config-dir",
        str(conf.parent),
        "model=timm_resnet",
        *FAST,
        "trainer.epochs=1",
        f"hydra.run.dir={run}",
        cwd=tmp_path,
    )
    metrics = read_metrics(run)
    assert metrics["status"] == "completed" and len(metrics["layers"]) > 5


@pytest.mark.slow
@needs_wiring
def test_stage2_at_2_bits_in_metrics_cost_and_export(tmp_path):
    """``layers.overrides=[{match: stage2, w_bits: 2}]``: stage2 at 2 bits, the body at 4, the
    edges at 8, in metrics.json's layer table, its cost report and the exported packed codes."""
    from qexp.export.fileformat import read_export

    run = tmp_path / "run"
    run_qexp(
        "train",
        *FAST,
        "trainer.epochs=1",
        "bits=4",
        "layers.overrides=[{match: stage2, w_bits: 2}]",
        f"hydra.run.dir={run}",
        cwd=tmp_path,
    )
    metrics = read_metrics(run)
    want = {"stem.0": 8, "stage1.0": 4, "stage2.0": 2, "stage2.4": 2, "fc": 8}
    table = {r["name"]: r for r in metrics["layers"]}
    cost = {r["name"]: r for r in metrics["cost"]["layers"]}
    run_qexp("export", str(run), cwd=tmp_path)
    tensors, meta = read_export(run / "export" / "model.safetensors")
    nodes = {n["module"]: n for n in meta["graph"]["nodes"] if n["op"] in ("qconv", "qlinear")}
    assert set(table) == set(cost) == set(nodes) == set(want)
    for name, bits in want.items():
        params = table[name]["params"]
        assert table[name]["w_bits"] == cost[name]["w_bits"] == nodes[name]["weight"]["bits"]
        assert table[name]["w_bits"] == bits and table[name]["ok"]
        packed = math.ceil(params * bits / 8)
        assert cost[name]["weight_bytes"] == packed == tensors[nodes[name]["weight"]["codes"]].size
        assert table[name]["kb"] * 1024 == pytest.approx(params * bits / 8)
    assert table["stage1.0"]["a_bits"] == table["stage2.0"]["a_bits"] == 4
    assert meta["packed_weight_bytes"] == metrics["cost"]["total"]["weight_bytes"]


@pytest.mark.slow
def test_sensitivity_of_a_digits_run_writes_table_figure_and_overrides(tmp_path):
    """`qexp sensitivity` on a trained digits run: ranked table, CSV, figure and an overrides
    YAML that meets the budget; with the config wired, `qexp train` runs that YAML as is."""
    import yaml

    run = tmp_path / "run"
    run_qexp("train", *FAST, "trainer.epochs=2", "bits=4", f"hydra.run.dir={run}", cwd=tmp_path)
    budget = 20.0
    proc = run_qexp_module(
        "qexp.analysis.command",
        str(run),
        "--bits",
        "2,3,4",
        "--budget-kb",
        str(budget),
        "--keep-edges",
        "--probes",
        "8",
        cwd=tmp_path,
    )
    out = run / "sensitivity"
    for name in ("sensitivity.md", "sensitivity.csv", "sensitivity.png", "sensitivity.json"):
        assert (out / name).is_file(), proc.stdout
    data = json.loads((out / "sensitivity.json").read_text())
    assert {r["name"] for r in data["layers"]} == {
        "stem.0",
        "stage1.0",
        "stage2.0",
        "stage2.4",
        "fc",
    }
    assert all(set(r["acc"]) == {"2", "3", "4"} for r in data["layers"])
    proxies = [r["proxy"]["2"] for r in data["layers"]]
    assert proxies == sorted(proxies, reverse=True)  # ranked, most sensitive first
    md = (out / "sensitivity.md").read_text()
    assert [
        ln.split(" | ")[1]
        for ln in md.splitlines()
        if ln.startswith("| ") and not ln.startswith("| rank")
    ] == [r["name"] for r in data["layers"]]
    yaml_path = out / "experiment" / "overrides_20kb.yaml"
    rules = yaml.safe_load(yaml_path.read_text())["layers"]["overrides"]
    params = {r["name"]: r["params"] for r in data["layers"]}
    size = sum(math.ceil(params[r["match"]] * r["w_bits"] / 8) for r in rules)
    assert size <= budget * 1024 and {r["match"] for r in rules} == set(params)
    picked = {r["match"]: r["w_bits"] for r in rules}
    assert picked["stem.0"] == picked["fc"] == 8  # --keep-edges: the run's edge bits
    assert "+experiment=overrides_20kb" in proc.stdout
    if not WIRED:
        pytest.skip("layers.overrides is not in the run config schema yet (phase B wiring)")
    run2 = tmp_path / "run2"
    run_qexp(
        "train",
        "--config-dir",
        str(out),
        "+experiment=overrides_20kb",
        *FAST,
        "trainer.epochs=1",
        "bits=4",
        f"hydra.run.dir={run2}",
        cwd=tmp_path,
    )
    metrics = read_metrics(run2)
    got = {r["name"]: r["w_bits"] for r in metrics["layers"]}
    assert got == {r["match"]: r["w_bits"] for r in rules}
    assert metrics["cost"]["total"]["weight_bytes"] == size


def run_qexp_module(module: str, *args: str, cwd: Path):
    """Run ``python -m MODULE ARGS`` (a command not yet registered in qexp.cli)."""
    import os
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    if proc.returncode != 0:
        raise AssertionError(f"{module} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def test_user_module_needs_no_qexp_base_class():
    """The contract a user network meets: an nn.Module taking num_classes, in_channels and
    image_size; qexp finds its Conv2d/Linear layers itself."""
    from qexp.quant.overrides import resolve_plan
    from qexp.quant.wrap import LayerBits

    namespace: dict = {}
    exec(compile(USER_NET, "my_pkg/net.py", "exec"), namespace)  # noqa: S102 - test's own code
    net = namespace["Net"](num_classes=10, in_channels=1, image_size=8)
    plan = resolve_plan(net, [], LayerBits(4, 4), 8, 8)
    assert [(r.name, r.role) for r in plan] == [
        ("features.0", "first"),
        ("body.0", "body"),
        ("head", "last"),
    ]
    assert net(torch.zeros(2, 1, 8, 8)).shape == (2, 10)


def test_timm_model_without_timm_is_one_line(monkeypatch):
    import sys

    from qexp.models.timm_model import timm_model

    monkeypatch.setitem(sys.modules, "timm", None)  # import timm now raises ImportError
    with pytest.raises(QexpError, match=r"timm is not installed; pip install 'qexp\[timm\]'"):
        timm_model(10, 1, 8, "resnet10t")


@pytest.mark.slow
def test_user_model_config_without_name(tmp_path):
    src, conf = _user_package(tmp_path)
    (conf / "model" / "unnamed.yaml").write_text("_target_: my_pkg.net.Net\n")
    proc = _train(
        tmp_path, src, conf, "model=unnamed", f"hydra.run.dir={tmp_path / 'r'}", check=False
    )
    # either it trains (the name defaults to the config's) or it says so in one line
    ok = proc.returncode == 0 or (
        proc.returncode == 2 and "model.name" in proc.stderr and "Traceback" not in proc.stderr
    )
    assert ok, proc.stderr[-2000:]


def test_overrides_file_name_is_a_config_name():
    from qexp.analysis.command import overrides_name

    assert overrides_name(20) == "overrides_20kb"
    assert overrides_name(19.4) == "overrides_19p4kb"
