"""The one training loop that every configuration runs through.

The trainer gets its parts ready-made from the composition root (qexp.train.run): the model
with its estimator, the data, the optimizer, the LR curve, the precision monitor, the typed
trainer settings and the run's identity. It never reads the composed config.
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.tensorboard import SummaryWriter

from qexp.config.schema import TrainerConfig
from qexp.curves import Curve
from qexp.data.base import DataModule
from qexp.errors import QexpError
from qexp.estimators.model import QuantModel
from qexp.quant.base import Quantizer
from qexp.quant.calibrate import calibration, set_observing
from qexp.quant.cost import cost_metrics
from qexp.quant.layers import quant_mode, refresh_weight_ranges
from qexp.record import RunRecord, RunStatus, write_record
from qexp.report.hparams import write_hparams
from qexp.train.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from qexp.train.compile import compiled, wants_compile
from qexp.train.distributed import (
    SINGLE,
    DistInfo,
    average_gradients,
    barrier,
    broadcast_state,
    eval_shard,
    shard,
    sum_over_ranks,
)
from qexp.train.inspect_levels import layer_table, weight_kb
from qexp.train.memory import peak_memory, trim_heap
from qexp.train.optim import set_lr
from qexp.train.precision import PrecisionMonitor

log = logging.getLogger("qexp")


@dataclass
class RunInfo:
    """Who the run is: where it writes, its seed, its config fingerprint, and the identity
    fields (estimator, quantizer, model, bits, ...) that head its ``metrics.json``."""

    run_dir: Path
    seed: int
    fingerprint: str
    identity: dict[str, Any] = field(default_factory=dict)


#: called after every epoch with the history so far (one dict per epoch, ``val_acc`` included);
#: returns True to stop training there (it may also raise, e.g. a tuner pruning the run)
EpochHook = Callable[[list[dict[str, float]]], bool]


class NonFiniteLoss(QexpError):
    """The training loss became NaN or infinite."""


class Trainer:
    """Trains, validates, checkpoints and finally tests one quantized model.

    Args:
        settings: the typed trainer settings (epochs, batch size, AMP, logging...).
        model: the quantized model with its estimator attached.
        data: the data set.
        optimizer: the optimizer over the model's parameter groups (each with ``base_lr``).
        lr_curve: LR multiplier as a function of training progress.
        precision: the budget penalty, bit-width logging and budget checks.
        run: the run's identity and dir.
        device: where to train.
        resume: continue from the run dir's last checkpoint when there is one.
        on_epoch: optional :data:`EpochHook` (a tuner's pruning, a study's early stop).
        dist: this process's rank in a data-parallel run (qexp.train.distributed): each rank
            trains on its slice of every global batch; rank 0 alone writes files.
    """

    def __init__(
        self,
        settings: TrainerConfig,
        model: QuantModel,
        data: DataModule,
        optimizer: torch.optim.Optimizer,
        lr_curve: Curve,
        precision: PrecisionMonitor,
        run: RunInfo,
        device: torch.device,
        resume: bool = False,
        on_epoch: EpochHook | None = None,
        dist: DistInfo = SINGLE,
    ) -> None:
        self.tcfg, self.model, self.data, self.device = settings, model, data, device
        self.optimizer, self.lr_curve, self.precision = optimizer, lr_curve, precision
        self.run, self.resume, self.on_epoch = run, resume, on_epoch
        self.run_dir = run.run_dir
        self.ckpt_dir = run.run_dir / "checkpoints"
        self.epochs = int(settings.epochs)
        self.steps_per_epoch = data.steps_per_epoch(int(settings.batch_size))
        self.total_steps = self.epochs * self.steps_per_epoch
        self.fingerprint = run.fingerprint
        use_amp = bool(settings.amp) and device.type == "cuda"
        self.amp_dtype = getattr(torch, settings.amp_dtype) if use_amp else None
        self.scaler = torch.amp.GradScaler(
            "cuda", enabled=use_amp and self.amp_dtype == torch.float16
        )
        # progress state (restored on resume)
        self.epoch = 0
        self.step = 0
        self.best_val = -1.0
        self.best_epoch = -1
        self.train_time = 0.0
        self.samples = 0
        self.history: list[dict[str, float]] = []
        self.quantizers = [m for m in model.net.modules() if isinstance(m, Quantizer)]
        self.dist = dist
        # What the training forward calls: the model, or the model under torch.compile (from
        # the step after calibration on; qexp/train/compile.py).
        self.train_model: nn.Module = model
        self._compile_pending = wants_compile(settings.compile, device)
        self.compiled = False

    # -- helpers ---------------------------------------------------------------------------------
    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def _progress_bar(self) -> bool:
        if not self.dist.is_main:
            return False
        mode = self.tcfg.progress
        return mode == "bar" or (mode == "auto" and sys.stderr.isatty())

    def _write_metrics(
        self, status: RunStatus, reason: str | None = None, **extra: Any
    ) -> RunRecord:
        data = {
            **self.run.identity,
            "epochs_done": self.epoch,
            "best_val_acc": self.best_val if self.best_val >= 0 else None,
            "best_epoch": self.best_epoch + 1 if self.best_epoch >= 0 else None,
            "train_time_s": round(self.train_time, 3),
            "samples_per_s": round(self.samples / self.train_time, 1) if self.train_time else None,
            "history": self.history,
            **self.data.data_report(),
            "compiled": self.compiled,
            "ranks": self.dist.world,
            **peak_memory(self.device),
            **extra,
        }
        record = RunRecord(status, reason, self.fingerprint, data)
        if self.dist.is_main:
            write_record(self.run_dir, record)
        return record

    # -- checkpoints ---------------------------------------------------------------------------
    def _state(self) -> dict[str, Any]:
        return {
            "format": 1,
            "config_hash": self.fingerprint,
            "epoch": self.epoch,
            "step": self.step,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": rng_state(),
            "best_val": self.best_val,
            "best_epoch": self.best_epoch,
            "train_time": self.train_time,
            "samples": self.samples,
            "history": self.history,
        }

    def _resume(self) -> bool:
        """Restore the last checkpoint of this run dir; False if there is none."""
        path = self.ckpt_dir / "last.pt"
        if not path.is_file():
            log.info(
                "resume=true but %s has no checkpoint yet: starting from scratch", self.run_dir
            )
            return False
        state = load_checkpoint(path)
        if state.get("config_hash") != self.fingerprint:
            raise QexpError(
                f"{self.run_dir} holds a run with a different config: resume it with the same "
                "overrides, or start a new run dir"
            )
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        self.best_val, self.best_epoch = float(state["best_val"]), int(state["best_epoch"])
        self.train_time, self.samples = float(state["train_time"]), int(state["samples"])
        self.history = list(state["history"])
        log.info("resumed %s at epoch %d (step %d)", self.run_dir, self.epoch, self.step)
        return True

    # -- evaluation ----------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, split: str, mode: str = "auto") -> float:
        """Accuracy on ``split`` with quantized layers in ``mode`` (auto = hard grid in eval)."""
        trim_heap()  # freed training memory serves the evaluation batches (peak RSS)
        self.model.eval()
        correct = total = 0
        with quant_mode(self.model, mode), self._autocast():
            for x, y in self.data.eval_batches(split, int(self.tcfg.eval_batch_size), self.device):
                x, y = eval_shard(x, y, self.dist)
                if y.numel():
                    correct += int((self.model(x).argmax(dim=1) == y).sum())
                    total += y.numel()
        self.model.train()
        correct, total = sum_over_ranks([correct, total], self.dist, self.device)
        return correct / total if total else float("nan")

    # -- training ------------------------------------------------------------------------------
    def _train_epoch(self, writer: SummaryWriter) -> tuple[float, float]:
        model, opt, est = self.model, self.optimizer, self.model.estimator
        model.train()
        every = int(self.tcfg.log_every)
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), device=self.device, dtype=torch.long)
        seen = 0
        win_loss = torch.zeros((), device=self.device)
        win_correct = torch.zeros((), device=self.device, dtype=torch.long)
        win_seen = 0
        batches = self.data.train_batches(
            int(self.tcfg.batch_size), self.epoch, self.run.seed, self.device
        )
        bar = None
        if self._progress_bar():
            from tqdm import tqdm

            bar = tqdm(
                total=self.steps_per_epoch,
                desc=f"epoch {self.epoch + 1}/{self.epochs}",
                leave=False,
                dynamic_ncols=True,
            )
        t0 = time.perf_counter()
        for i, (x, y) in enumerate(batches):
            progress = self.step / self.total_steps
            for k, v in est.step(progress).items():
                writer.add_scalar(f"train/{k}", float(v), self.step)
            lr = set_lr(opt, self.lr_curve(progress))
            x, y, n = shard(x, y, self.dist)
            loss, logits, extra = self._forward_backward(x, y)
            if self.tcfg.grad_clip is not None:
                self.scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(model.parameters(), float(self.tcfg.grad_clip))
            self.scaler.step(opt)
            self.scaler.update()
            for q in self.quantizers:
                q.clamp_()
            est.after_optimizer_step()
            self.step += 1
            refresh_weight_ranges(model, self.step)
            # every rank holds rank 0's calibrated state, and its buffers after every step
            broadcast_state(model, self.dist, buffers_only=self.step > 1)
            batch_correct = (logits.detach().argmax(dim=1) == y).sum()
            loss_sum += loss.detach() * n
            correct += batch_correct
            win_loss += loss.detach() * n
            win_correct += batch_correct
            seen += n
            win_seen += n
            if self.step % every == 0 or i + 1 == self.steps_per_epoch:
                w_loss, w_correct, w_seen = sum_over_ranks(
                    [float(win_loss), float(win_correct), win_seen], self.dist, self.device
                )
                wl = w_loss / w_seen
                if not math.isfinite(wl):
                    raise NonFiniteLoss(self._nan_message())
                writer.add_scalar("train/loss", wl, self.step)
                writer.add_scalar("train/acc", w_correct / w_seen, self.step)
                writer.add_scalar("train/lr", lr, self.step)
                for k, v in extra.items():  # device tensors: synced here, not every step
                    writer.add_scalar(f"train/{k}", float(v), self.step)
                self.precision.log(writer, self.step)
                win_loss.zero_()
                win_correct.zero_()
                win_seen = 0
                if bar is None and self.tcfg.progress != "none":
                    log.info(
                        "epoch %d step %d/%d loss %.4f",
                        self.epoch + 1,
                        self.step,
                        self.total_steps,
                        wl,
                    )
            if bar is not None:
                bar.update(1)
                if self.step % 10 == 0:
                    bar.set_postfix(loss=f"{float(loss):.3f}")
        if bar is not None:
            bar.close()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.train_time += time.perf_counter() - t0
        total_loss, total_correct, seen = sum_over_ranks(
            [float(loss_sum), float(correct), seen], self.dist, self.device
        )
        self.samples += int(seen)
        epoch_loss = total_loss / max(seen, 1)
        if not math.isfinite(epoch_loss):
            raise NonFiniteLoss(self._nan_message())
        return epoch_loss, total_correct / max(seen, 1)

    def _forward_backward(self, x: torch.Tensor, y: torch.Tensor):
        """Loss of the batch, its backward pass and the gradients averaged over the ranks;
        returns (loss, logits, values to log). Compiles the model on the step after the
        calibration step when ``trainer.compile`` asks for it."""
        if self._compile_pending and self.step > 0:
            self._compile_pending = False
            return self._first_compiled_step(x, y)
        # The first step of a fresh run is the calibration phase: quantizers take their
        # data-derived state from this batch (qexp.quant.calibrate).
        calib = calibration(self.model) if self.step == 0 else contextlib.nullcontext()
        with calib, self._autocast():
            loss, logits, extra = self.model.estimator.loss(
                self.train_model, x, y, F.cross_entropy
            )
        loss = loss + self.precision.penalty()
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        average_gradients(self.model, self.dist)
        return loss, logits, extra

    def _first_compiled_step(self, x: torch.Tensor, y: torch.Tensor):
        """The first step under torch.compile; if compiling fails, one warning line, the state
        from before the step back, and the step (and the rest of the run) eagerly."""
        before = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        rng = rng_state()
        self.train_model = compiled(self.model, self.device)
        try:
            out = self._forward_backward(x, y)
        except Exception as exc:  # any failure of the compiler stack: train eagerly instead
            reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
            log.warning(
                "trainer.compile: torch.compile failed (%s: %s); training eagerly",
                type(exc).__name__,
                reason,
            )
            self.train_model = self.model
            self.model.load_state_dict(before)
            set_rng_state(rng)
            return self._forward_backward(x, y)
        self.compiled = True
        log.info("training forward compiled with torch.compile")
        return out

    def _should_stop(self) -> bool:
        """Early stop on a validation plateau: no better epoch for ``patience`` epochs.

        Read from the restored state alone, so a resumed run stops where the uncut one would.
        """
        patience = self.tcfg.patience
        if patience is None or self.best_epoch < 0:
            return False
        if self.epoch - 1 - self.best_epoch >= int(patience):
            log.info(
                "stopping early: val accuracy has not improved for %d epochs (best epoch %d)",
                patience,
                self.best_epoch + 1,
            )
            return True
        return False

    def _nan_message(self) -> str:
        last = self.ckpt_dir / "last.pt"
        kept = (
            f"the last good checkpoint (epoch {self.epoch}) is kept in {last}"
            if last.is_file() else "no epoch had finished, so no checkpoint was written"
        )
        return (
            f"the training loss became NaN/inf in epoch {self.epoch + 1} (step {self.step}): "
            f"lower trainer.lr (now {self.tcfg.lr}) or set trainer.grad_clip; {kept}"
        )

    def fit(self) -> dict[str, Any]:
        """Train (or resume), then test the best-validation model; return the metrics."""
        if self.resume:
            self._resume()
        if self.step > 0:  # calibrated before the checkpoint: only the trackers observe
            set_observing(self.model, "train")
        writer = (
            SummaryWriter(str(self.run_dir), purge_step=self.step if self.step else None)
            if self.dist.is_main
            else _NullWriter()
        )
        try:
            self._write_metrics(RunStatus.RUNNING)
            while self.epoch < self.epochs and not self._should_stop():
                t_epoch = time.perf_counter()
                train_loss, train_acc = self._train_epoch(writer)
                val_acc = self.evaluate("val") if self.data.num_val else train_acc
                writer.add_scalar("val/acc", val_acc, self.step)
                if self.tcfg.histograms:
                    for name, layer in self.model.layers():
                        writer.add_histogram(
                            f"weights/{name}", layer.weight.detach().float().cpu(), self.step
                        )
                if (
                    self.model.estimator.is_final_form()
                    and self.precision.satisfied()
                    and val_acc > self.best_val
                ):
                    self.best_val, self.best_epoch = val_acc, self.epoch
                    if self.dist.is_main:
                        save_checkpoint(
                            {"model": self.model.state_dict(), "epoch": self.epoch},
                            self.ckpt_dir / "best.pt",
                        )
                self.history.append(
                    {
                        "epoch": self.epoch + 1,
                        "train_loss": train_loss,
                        "train_acc": train_acc,
                        "val_acc": val_acc,
                        **self.precision.epoch_summary(),
                    }
                )
                log.info(
                    "epoch %d/%d  loss %.4f  train_acc %.4f  val_acc %.4f  (%.1fs)",
                    self.epoch + 1,
                    self.epochs,
                    train_loss,
                    train_acc,
                    val_acc,
                    time.perf_counter() - t_epoch,
                )
                self.epoch += 1
                if self.dist.is_main:
                    save_checkpoint(self._state(), self.ckpt_dir / "last.pt")
                barrier(self.dist)  # the checkpoints are on disk before any rank reads them
                self._write_metrics(RunStatus.RUNNING)
                writer.flush()
                if self.on_epoch is not None and self.on_epoch(self.history):
                    break
            metrics = self._final_test(writer)
        except NonFiniteLoss as exc:
            self._write_metrics(RunStatus.FAILED, str(exc))
            raise
        finally:
            writer.close()
        return metrics

    def _final_test(self, writer: SummaryWriter) -> dict[str, Any]:
        best = self.ckpt_dir / "best.pt"
        if best.is_file():
            self.model.load_state_dict(load_checkpoint(best)["model"])
        if self.data.test_sealed:  # a tuning run: validation only, the test split stays unread
            return self._write_metrics(RunStatus.COMPLETED, "tuning run: not tested").to_json()
        test_acc = self.evaluate("test", "auto")
        test_acc_latent = self.evaluate("test", "latent")
        extra: dict[str, Any] = {}
        if self.model.estimator.has_soft_forward:
            soft = self.evaluate("test", "soft")
            extra["test_acc_soft"] = soft
            extra["soft_hard_gap"] = soft - test_acc
            writer.add_scalar("test/acc_soft", soft, self.step)
            writer.add_scalar("test/soft_hard_gap", soft - test_acc, self.step)
        x, _ = next(iter(self.data.eval_batches("test", 256, self.device)))
        table = layer_table(self.model.net, x)
        honest = all(row["ok"] for row in table)
        if not honest:
            bad = [r["name"] for r in table if not r["ok"]]
            log.error("layers with more levels than their bits allow: %s", bad)
        kb = weight_kb(table)
        writer.add_scalar("test/acc", test_acc, self.step)
        writer.add_scalar("test/acc_latent", test_acc_latent, self.step)
        status, reason = RunStatus.COMPLETED, None
        if not honest:
            status, reason = RunStatus.FAILED, "levels exceed bit width"
        elif self.precision.unmet():  # no epoch met the budget: the last one is reported
            reason = self.precision.unmet()
        extra.update(self.precision.final(writer, table, self.step))
        extra.update(cost_metrics(self.model.net, x))
        extra.update(self.model.estimator.state_summary())
        record = self._write_metrics(
            status,
            reason,
            test_acc=test_acc,
            test_acc_latent=test_acc_latent,
            weight_kb=round(kb, 3),
            layers=table,
            **extra,
        )
        log.info(
            "test_acc %.4f (hard-quantized)  test_acc_latent %.4f  weight %.1f KB",
            test_acc,
            test_acc_latent,
            kb,
        )
        peak = peak_memory(self.device)
        log.info(
            "peak memory: %.0f MB resident%s",
            peak["peak_rss_mb"],
            f", {peak['peak_gpu_mb']:.0f} MB GPU" if "peak_gpu_mb" in peak else "",
        )
        metrics = record.to_json()
        if self.dist.is_main:
            write_hparams(writer, metrics, self.run_dir, self.step)
        return metrics


class _NullWriter:
    """Stands in for the TensorBoard writer on ranks other than 0: records nothing."""

    def __getattr__(self, name: str):
        return lambda *args, **kwargs: None
