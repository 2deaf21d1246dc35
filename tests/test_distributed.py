"""Data-parallel training on CPU (gloo): `torchrun --nproc_per_node=2` on digits against one
process with the same global batch, a killed two-process run resumed, and rank-0 state."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import FAST

from qexp.train import distributed as D
from qexp.train.faults import FAULT_ENV

EPOCHS = ["trainer.epochs=8"]
TIMEOUT = 600

# `qexp train` under torchrun, dying like a SIGKILLed process (every rank) right after epoch 2
# (its checkpoint and metrics.json are on disk; qexp/train/faults.py)
KILLED_AFTER_EPOCH_2 = {FAULT_ENV: "kill@epoch:2"}

# Two ranks calibrate quantizers on different data, then rank 0's state is broadcast.
RANK_STATE = """
import torch, torch.distributed as dist
from torch import nn
from qexp.quant.lsq import LSQQuantizer
from qexp.quant.uniform import UniformQuantizer
from qexp.train import distributed as D

info = D.env_world()
D.init(info, torch.device("cpu"))
torch.manual_seed(info.rank)
act = UniformQuantizer(2, "activation")
lsq = LSQQuantizer(4, "activation")
net = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), act, lsq)
# rank 0 sees only positive values (unsigned grids), rank 1 negative ones too (signed grids)
h = net[1](net[0](torch.rand(16, 4) + 5 if info.rank == 0 else torch.randn(16, 4)))
if info.rank == 0:
    h = h.abs()
act.observe(h)  # the calibration step: each rank on its own data
a = act(h)
lsq.observe(a)
lsq(a).sum().backward()
grads = [p.grad.clone() for p in net.parameters()]
D.average_gradients(net, info)
D.broadcast_state(net, info)
states = [None, None]
dist.all_gather_object(states, {k: v.tolist() for k, v in net.state_dict().items()})
all_grads = [None, None]
dist.all_gather_object(all_grads, [g.tolist() for g in grads])
mirrors = [None, None]
dist.all_gather_object(mirrors, [act._is_signed(), lsq._is_signed(), act.is_calibrated()])
if info.is_main:
    mean = [((torch.tensor(a) + torch.tensor(b)) / 2).tolist() for a, b in zip(*all_grads)]
    print("RESULT", {
        "same_state": states[0] == states[1],
        "mirrors": mirrors,
        "grads_averaged": [p.grad.tolist() for p in net.parameters()] == mean,
    })
D.shutdown()
"""


def torchrun(
    cwd: Path, *args: str, script: str | None = None, nproc: int = 2, env: dict | None = None
):
    """`torchrun --nproc_per_node=N` of `qexp` (or of ``script``) with ``args`` (and ``env``
    added to the environment)."""
    # --standalone: a free local port, so concurrent runs on one machine do not collide
    head = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    head += [f"--nproc_per_node={nproc}"]
    if script is not None:
        path = cwd / "script.py"
        path.write_text(textwrap.dedent(script))
        target = [str(path)]
    else:
        target = ["-m", "qexp.cli"]
    env = {**os.environ, "HYDRA_FULL_ERROR": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(
        [*head, *target, *args], cwd=cwd, env=env, capture_output=True, text=True,
        timeout=TIMEOUT,
    )  # fmt: skip


def single(cwd: Path, *args: str):
    env = {**os.environ, "HYDRA_FULL_ERROR": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "qexp.cli", *args], cwd=cwd, env=env, capture_output=True,
        text=True, timeout=TIMEOUT,
    )  # fmt: skip


def ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("ddp")
    one, two = cwd / "one", cwd / "two"
    ok(single(cwd, "train", *FAST, *EPOCHS, f"hydra.run.dir={one}"))
    log = ok(torchrun(cwd, "train", *FAST, *EPOCHS, f"hydra.run.dir={two}"))
    return {"cwd": cwd, "one": one, "two": two, "log": log}


@pytest.mark.slow
def test_two_processes_reach_the_accuracy_of_one(runs):
    one, two = metrics(runs["one"]), metrics(runs["two"])
    assert one["ranks"] == 1 and two["ranks"] == 2
    assert two["status"] == "completed"
    # the same global batches: the same accuracy within noise (BatchNorm statistics are each
    # rank's own half batch, so not bit for bit)
    assert abs(two["test_acc"] - one["test_acc"]) <= 0.02
    assert abs(two["history"][-1]["train_loss"] - one["history"][-1]["train_loss"]) < 0.05
    assert two["samples_per_s"] and two["history"][-1]["epoch"] == 8
    # rank 0 alone writes: one log line per epoch, one run dir
    assert runs["log"].count("epoch 8/8") == 1
    assert sorted(p.name for p in runs["cwd"].iterdir()) == ["one", "two"]


@pytest.mark.slow
def test_killed_two_process_run_resumes_and_finishes(runs, tmp_path):
    run_dir = tmp_path / "killed"
    args = ["train", *FAST, *EPOCHS, f"hydra.run.dir={run_dir}"]
    killed = torchrun(tmp_path, *args, env=KILLED_AFTER_EPOCH_2)
    assert killed.returncode != 0
    assert metrics(run_dir)["epochs_done"] == 2
    assert (run_dir / "checkpoints" / "last.pt").is_file()
    ok(torchrun(tmp_path, *args, "resume=true"))
    resumed, straight = metrics(run_dir), metrics(runs["two"])
    assert resumed["status"] == "completed" and resumed["epochs_done"] == 8
    assert [h["epoch"] for h in resumed["history"]] == list(range(1, 9))
    # the same run as the uninterrupted one
    assert resumed["test_acc"] == pytest.approx(straight["test_acc"], abs=1e-9)
    for a, b in zip(resumed["history"], straight["history"], strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)


@pytest.mark.slow
def test_rank0_calibrated_state_reaches_every_rank(tmp_path):
    out = ok(torchrun(tmp_path, script=RANK_STATE))
    line = next(line for line in out.splitlines() if line.startswith("RESULT"))
    result = eval(line[len("RESULT "):])  # noqa: S307 (our own script's dict)
    assert result["same_state"]
    # rank 1 had decided signed grids from its data; it now mirrors rank 0's unsigned ones
    assert result["mirrors"] == [[False, False, True], [False, False, True]]
    assert result["grads_averaged"]


# -- sharding a batch by hand (pure functions: no process group) ---------------------------------
TEXT = "".join(f"line {i}: the rank and the world, {i * 7 % 13} windows\n" for i in range(40))


def _text_batch(tmp_path: Path, windows: int):
    from qexp.data.text import TextData

    path = tmp_path / "corpus.txt"
    path.write_text(TEXT)
    data = TextData(path=str(path), block_size=8)
    x, y = next(data.train_batches(windows, epoch=0, seed=0, device=torch.device("cpu")))
    return data, x, y


def test_each_rank_gets_the_targets_of_its_own_text_windows(tmp_path):
    data, x, y = _text_batch(tmp_path, windows=5)
    decode = lambda ids: "".join(data.vocab[i] for i in ids.tolist())  # noqa: E731
    counted = 0
    for rank in range(2):
        xs, ys, n = D.shard(x, y, D.DistInfo(rank=rank, world=2, local_rank=rank))
        assert torch.equal(xs, x[rank::2])
        assert ys.shape == (xs.shape[0] * 8,) and n == ys.numel()
        for window, targets in zip(xs, ys.view(-1, 8), strict=True):
            # the targets are this window shifted by one character, in the text
            assert torch.equal(targets[:-1], window[1:])
            assert decode(window) + decode(targets[-1:]) in TEXT
        ev_x, ev_y = D.eval_shard(x, y, D.DistInfo(rank=rank, world=2, local_rank=rank))
        assert torch.equal(ev_x, xs) and torch.equal(ev_y, ys)
        counted += n
    assert counted == y.numel()


def test_classification_batches_shard_as_before():
    x, y = torch.randn(7, 3), torch.arange(7)
    for rank in range(3):
        xs, ys, n = D.shard(x, y, D.DistInfo(rank=rank, world=3, local_rank=rank))
        assert torch.equal(xs, x[rank::3]) and torch.equal(ys, y[rank::3]) and n == ys.numel()


def test_a_text_batch_smaller_than_the_world_is_trained_whole_and_counted_once(tmp_path):
    _, x, y = _text_batch(tmp_path, windows=1)
    counts = []
    for rank in range(2):
        xs, ys, n = D.shard(x, y, D.DistInfo(rank=rank, world=2, local_rank=rank))
        assert torch.equal(xs, x) and torch.equal(ys, y)
        counts.append(n)
    assert counts == [y.numel(), 0]
