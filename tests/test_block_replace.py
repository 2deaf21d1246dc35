"""Block replacement: mixed nets vs hand-built compositions, a frozen partner, the partner cache."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
import torch.nn.functional as F
from conftest import FAST, compose_config, read_metrics, run_qexp
from torch import nn

from qexp.estimators.base import EstimatorContext
from qexp.estimators.block_replace import BlockReplace, kd_loss
from qexp.estimators.model import QuantModel
from qexp.models import ResNet20, SmallCNN
from qexp.quant.calibrate import set_observing
from qexp.quant.uniform import UniformQuantizer
from qexp.quant.wrap import LayerBits, attach_estimator, quantize_model


def _factory(role: str, bits: int):
    return None if bits >= 32 else UniformQuantizer(bits, role)


def _pair(make) -> tuple[QuantModel, nn.Module, BlockReplace]:
    """A 2-bit LP model with a BlockReplace estimator and an FP partner of the same class."""
    torch.manual_seed(0)
    partner = make().eval()
    torch.manual_seed(1)  # different weights, so a swapped block is visible in the output
    net = make()
    quantize_model(net, _factory, _factory, LayerBits(2, 2), first_bits=8, last_bits=8)
    est = BlockReplace(mixed_terms="both", replace="all")
    model = QuantModel(net, est)
    attach_estimator(net, est)
    ctx = EstimatorContext(total_steps=1, device=torch.device("cpu"), partner=partner)
    est.attach(model, ctx)
    model.train()
    set_observing(model, "calibrate")  # every training forward observes, the first calibrates
    return model, partner, est


def _small_cnn_reference(p: SmallCNN, lp: SmallCNN, i: int, x: torch.Tensor) -> torch.Tensor:
    h = p.stem(x)
    h = (lp if i == 0 else p).stage1(h)
    h = (lp if i == 1 else p).stage2(h)
    return p.fc(torch.flatten(p.pool(h), 1))


def _resnet_reference(p: ResNet20, lp: ResNet20, i: int, x: torch.Tensor) -> torch.Tensor:
    h = p.act(p.bn1(p.conv1(x)))
    k = 0
    for stage in ("layer1", "layer2", "layer3"):
        for j in range(len(getattr(p, stage))):
            h = getattr(lp if k == i else p, stage)[j](h)
            k += 1
    return p.fc(torch.flatten(p.pool(h), 1))


CASES = {
    "small_cnn": (lambda: SmallCNN(10, 1, 8, width=8), (1, 8), _small_cnn_reference),
    "resnet20": (lambda: ResNet20(10, 3, 8, width=4, depth=14), (3, 8), _resnet_reference),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_mixed_nets_equal_hand_composition(case):
    make, (c, s), reference = CASES[case]
    model, partner, est = _pair(make)
    x = torch.randn(16, c, s, s)
    with torch.no_grad():
        torch.testing.assert_close(est.mixed_forward(x, None), partner(x), rtol=0, atol=0)
    assert len(est.block_names) == len(model.net.block_names()) >= 2
    for i in range(len(est.block_names)):
        # The LP blocks train (batch statistics, activation-range EMA): start each forward from
        # the same state so both sides compute the same function.
        state = copy.deepcopy(model.state_dict())
        out = est.mixed_forward(x, i)
        # gradients reach exactly the replaced LP block, through the frozen partner suffix
        model.zero_grad()
        out.square().sum().backward()
        block = model.net.get_submodule(est.block_names[i])
        inside = {id(p) for p in block.parameters()}
        for p in model.net.parameters():
            assert (p.grad is not None and p.grad.abs().sum() > 0) == (id(p) in inside)
        model.load_state_dict(state)
        with torch.no_grad():
            ref = reference(partner, model.net, i, x)
            torch.testing.assert_close(out.detach(), ref)
            assert not torch.allclose(out, partner(x))
        model.load_state_dict(state)
        assert all(p.grad is None for p in partner.parameters())


def test_loss_terms_and_buffer_restore():
    model, partner, est = _pair(CASES["small_cnn"][0])
    x, y = torch.randn(32, 1, 8, 8), torch.randint(0, 10, (32,))
    # After the step, the LP blocks' statistics (BN running stats, activation ranges) are those
    # of the LP net's own forward: the mixed nets' forwards leave no trace in them.
    start = copy.deepcopy(model.state_dict())
    model(x)
    expected = {k: v.clone() for k, v in model.net.named_buffers()}
    model.load_state_dict(start)
    loss, logits, logs = est.loss(model, x, y, F.cross_entropy)
    touched = {k for k, v in model.net.named_buffers() if not torch.equal(v, expected[k])}
    assert any(k.startswith(("stage1", "stage2")) for k in touched)  # mixed forwards ran
    with torch.no_grad():
        teacher = partner(x)
    lp, kd, mixed = (float(logs[k]) for k in ("lp_loss", "kd", "mixed"))
    assert lp == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-5)
    assert kd == pytest.approx(kd_loss(logits, teacher, 4.0).item(), rel=1e-5)
    assert loss.item() == pytest.approx(lp + kd + mixed, rel=1e-5)
    loss.backward()
    est.after_optimizer_step()
    for k, v in model.net.named_buffers():
        torch.testing.assert_close(v, expected[k], rtol=0, atol=0)
    assert not any("partner" in k for k in model.state_dict())


_compose = compose_config

BR_ARGS = ["estimator=block_replace", "bits=2", "model=small_cnn", "model.width=8", *FAST,
           "trainer.epochs=1"]  # fmt: skip


@pytest.mark.slow
def test_partner_frozen_and_cached(tmp_path, monkeypatch, caplog):
    import qexp.train.run as run_mod
    from qexp.train.trainer import Trainer

    monkeypatch.setenv("QEXP_CACHE", str(tmp_path / "cache"))
    caplog.set_level(logging.INFO, logger="qexp")
    spec = run_mod.run_spec(_compose(*BR_ARGS))
    cpu = torch.device("cpu")
    parts = run_mod.build_run(spec, tmp_path / "a")
    data, model = parts.data, parts.model
    assert "training the full-precision partner" in caplog.text
    partners = list((tmp_path / "cache" / "partners").iterdir())
    key_dirs = [p for p in partners if p.is_dir()]
    assert len(key_dirs) == 1 and read_metrics(key_dirs[0])["status"] == "completed"
    best = key_dirs[0] / "checkpoints" / "best.pt"
    mtime = best.stat().st_mtime_ns
    partner = model.estimator.partner
    assert not partner.training and not any(p.requires_grad for p in partner.parameters())
    snapshot = copy.deepcopy(partner.state_dict())
    metrics = Trainer(parts).fit()
    assert metrics["status"] == "completed"
    for k, v in partner.state_dict().items():
        torch.testing.assert_close(v, snapshot[k], rtol=0, atol=0)
    assert not any("partner" in k for k in model.state_dict())

    # Second run with the same key: resolves to the cached partner, never trains.
    def no_training(*args, **kwargs):
        raise AssertionError("the cached partner was trained again")

    monkeypatch.setattr(run_mod, "train_cached_run", no_training)
    caplog.clear()
    rng = torch.get_rng_state()
    source = run_mod.resolve_partner(spec, data.info)
    assert source == key_dirs[0]
    assert "reusing the cached full-precision partner" in caplog.text
    assert best.stat().st_mtime_ns == mtime
    assert torch.equal(torch.get_rng_state(), rng)  # the run's random stream is untouched
    again = run_mod.build_model(spec, data.info, cpu, total_steps=10, partner=source)
    for k, v in again.estimator.partner.state_dict().items():
        torch.testing.assert_close(v, snapshot[k], rtol=0, atol=0)
    # an explicit partner path works too, and is used as it is
    explicit = run_mod.run_spec(_compose(*BR_ARGS, f"partner.source={key_dirs[0]}"))
    assert run_mod.resolve_partner(explicit, data.info) == key_dirs[0]


def test_partner_key_depends_on_what_determines_it():
    from qexp.train.partner import partner_config, partner_key
    from qexp.train.run import run_spec

    def key(*extra: str) -> str:
        return partner_key(partner_config(run_spec(_compose(*BR_ARGS, *extra)).config))[0]

    base = key()
    # the LP side (bits, estimator options, quantizer) shares one partner ...
    assert key("bits=3") == base
    assert key("estimator.w_kd=0.5", "estimator.replace=all") == base
    assert key("trainer.threads=2") == base
    # ... what shapes the FP training does not
    changes = ["seed=1", "trainer.lr=0.01", "model.width=16", "dataset.subset=500",
               "trainer.batch_size=64", "schedule=constant",
               "partner.epochs=3"]  # fmt: skip
    for extra in changes:
        assert key(extra) != base, extra


def test_nested_base_is_validated():
    from qexp.config.validate import validate_config
    from qexp.errors import QexpError

    cfg = _compose(*BR_ARGS, "+estimator.base.bogus=1")
    with pytest.raises(QexpError, match="estimator.base.bogus"):
        validate_config(cfg)


@pytest.mark.slow
def test_cli_block_replace_end_to_end(tmp_path):
    env = {"QEXP_CACHE": str(tmp_path / "cache")}
    run_qexp("train", "estimator=block_replace", "bits=2", "model=small_cnn", "model.width=8",
             "trainer.epochs=2", *FAST, f"hydra.run.dir={tmp_path / 'a'}", cwd=tmp_path,
             env=env)  # fmt: skip
    m = read_metrics(tmp_path / "a")
    assert m["status"] == "completed" and m["test_acc"] >= 0.2  # twice chance
    # Second run, QuantNet as the base estimator and 1 epoch, but a partner trained for 2 epochs
    # (the same key): reuses the cached partner, and logs the soft/hard gap of its base.
    proc = run_qexp("train", "estimator=block_replace", "bits=1", "model=small_cnn",
                    "model.width=8", "trainer.epochs=1", "partner.epochs=2", *FAST,
                    f"hydra.run.dir={tmp_path / 'b'}",
                    "estimator.base._target_=qexp.estimators.quantnet.QuantNet",
                    "+estimator.base.gamma=${schedule.gamma}", cwd=tmp_path, env=env)  # fmt: skip
    assert "reusing the cached full-precision partner" in proc.stdout + proc.stderr
    m = read_metrics(tmp_path / "b")
    assert m["status"] == "completed" and "soft_hard_gap" in m
    assert all(r["levels"]["weight"] <= 2 for r in m["layers"] if r["role"] == "body")


def test_unfinished_partner_with_other_settings_is_discarded(tmp_path, monkeypatch):
    from qexp.train import partner as partner_mod
    from qexp.train.checkpoint import save_checkpoint
    from qexp.train.run import run_spec

    monkeypatch.setenv("QEXP_CACHE", str(tmp_path))
    fp = partner_mod.partner_config(run_spec(_compose(*BR_ARGS)).config)
    key, _ = partner_mod.partner_key(fp)
    stale = tmp_path / "partners" / key / "checkpoints" / "last.pt"
    save_checkpoint({"config_hash": "from-other-settings"}, stale)
    calls = []
    train = lambda c, d: calls.append(d) or {}  # noqa: E731
    assert partner_mod.cached_fp_run(fp, train) == tmp_path / "partners" / key
    assert calls == [tmp_path / "partners" / key] and not stale.exists()


def test_model_without_blocks_is_refused_before_any_partner_is_trained(monkeypatch):
    import qexp.train.run as run_mod
    from qexp.data.base import DataInfo
    from qexp.errors import QexpError

    def no_partner(*args, **kwargs):
        raise AssertionError("the partner must not be built for a model without blocks")

    monkeypatch.setattr(run_mod, "cached_fp_run", no_partner)
    spec = run_mod.run_spec(
        _compose("estimator=block_replace", "model=mlp", "model.hidden=[32]", "dataset=digits")
    )
    info = DataInfo(name="digits", num_classes=10, in_channels=1, image_size=8)
    with pytest.raises(QexpError, match="no blocks"):
        run_mod.resolve_partner(spec, info)
    with pytest.raises(QexpError, match="no blocks"):
        run_mod.build_model(spec, info, torch.device("cpu"), total_steps=10)


@pytest.mark.slow
def test_partner_of_a_budget_run_is_full_precision_and_reused(tmp_path, monkeypatch):
    """block_replace + dq_u3 under a memory budget: the partner carries no quantizer options
    (so no budget it could never meet), completes, is cached, and a second run reuses it."""
    import qexp.train.run as run_mod
    from qexp.train import partner as partner_mod
    from qexp.train.run import run_spec, run_training

    monkeypatch.setenv("QEXP_CACHE", str(tmp_path / "cache"))
    budget = ["quantizer=dq_u3", "budget.weight_kb=18", "bits=4"]
    cfg = _compose(*BR_ARGS, *budget)
    fp = partner_mod.partner_config(run_spec(cfg).config)
    assert set(fp["quantizer"]) == {"_target_", "name"}  # no quantizer options
    assert fp["budget"]["weight_kb"] is None  # and no budget it could never meet
    layers = fp["layers"]
    assert (fp["w_bits"], fp["a_bits"], layers["first_bits"], layers["last_bits"]) == (
        32, 32, None, None,
    )
    first = run_training(cfg, tmp_path / "a")
    assert first["status"] == "completed"
    key_dirs = [p for p in (tmp_path / "cache" / "partners").iterdir() if p.is_dir()]
    assert len(key_dirs) == 1
    record = read_metrics(key_dirs[0])
    assert record["status"] == "completed" and record["reason"] is None
    assert (key_dirs[0] / "checkpoints" / "best.pt").is_file()
    # all weights in full precision: 4 bytes per weight, nothing like an 18 KB budget
    assert all(row["w_bits"] == 32 for row in record["layers"])

    def no_training(*args, **kwargs):
        raise AssertionError("the cached partner was trained again")

    second = _compose(*BR_ARGS, *budget, "estimator.w_kd=0.5")
    monkeypatch.setattr(run_mod, "train_cached_run", no_training)
    again = run_training(second, tmp_path / "b")
    assert again["status"] == "completed"


@pytest.mark.slow
def test_export_of_a_block_replace_run_trains_nothing(tmp_path, monkeypatch):
    """Exporting needs the trained LP network only: with the partner cache emptied, `qexp
    export` of a finished block_replace run succeeds and trains no partner."""
    import shutil

    import qexp.train.run as run_mod
    from qexp.export.write import main as export_main

    cache = tmp_path / "cache"
    monkeypatch.setenv("QEXP_CACHE", str(cache))
    run_dir = tmp_path / "run"
    run_qexp("train", *BR_ARGS, f"hydra.run.dir={run_dir}", cwd=tmp_path,
             env={"QEXP_CACHE": str(cache)})  # fmt: skip
    assert read_metrics(run_dir)["status"] == "completed"
    shutil.rmtree(cache)

    def no_training(*args, **kwargs):
        raise AssertionError("exporting trained a partner")

    monkeypatch.setattr(run_mod, "train_cached_run", no_training)
    monkeypatch.setattr(run_mod, "cached_fp_run", no_training)
    assert export_main([str(run_dir)]) == 0
    assert (run_dir / "export" / "model.safetensors").is_file()
    assert not cache.exists()
