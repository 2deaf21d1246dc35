"""The one training loop that every configuration runs through.

The trainer gets its parts ready-made from the composition root (qexp.train.run) and never
reads the composed config. It owns the loop only: epochs of :class:`~qexp.train.step.TrainStep`
calls, windowed logging, validation and the choice of the best epoch. Checkpoints
(:class:`~qexp.train.checkpoint.RunCheckpoints`) and reports
(:class:`~qexp.train.reporter.RunReporter`) observe it; the final test is its own module
(qexp.train.final_test).
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import torch

from qexp.errors import QexpError
from qexp.quant.calibrate import set_observing
from qexp.record import RunRecord, RunStatus
from qexp.train.checkpoint import RunCheckpoints
from qexp.train.distributed import barrier
from qexp.train.evaluate import evaluate
from qexp.train.faults import fault_point
from qexp.train.final_test import final_test
from qexp.train.parts import RunParts
from qexp.train.progress import Progress
from qexp.train.reporter import RunReporter, SilentReporter
from qexp.train.step import StepResult, TrainStep
from qexp.train.train_log import LossWindow, bar_wanted, progress_bar

log = logging.getLogger("qexp")


class NonFiniteLoss(QexpError):
    """The training loss became NaN or infinite."""


class Trainer:
    """Trains, validates, checkpoints and finally tests one quantized model.

    ``parts`` (qexp.train.parts.RunParts) are used as they are: the trainer keeps a reference,
    never copies. ``parts.dist``: each rank trains on its slice of every global batch; rank 0
    alone writes files.
    """

    def __init__(self, parts: RunParts) -> None:
        self.parts = parts
        self.progress = Progress()
        self.steps_per_epoch = parts.data.steps_per_epoch(int(parts.settings.batch_size))
        self.total_steps = int(parts.settings.epochs) * self.steps_per_epoch
        self.step_fn = TrainStep(
            parts.model,
            parts.optimizer,
            parts.lr_curve,
            parts.settings,
            parts.device,
            penalty=parts.precision.penalty,
            dist=parts.dist,
        )
        main = parts.dist.is_main
        self.checkpoints = RunCheckpoints(parts.run.run_dir, parts.run.fingerprint, writes=main)
        self.reporter: RunReporter | None = None  # opened by fit(), after a resume

    # the parts the loop and its observers read
    model = property(lambda self: self.parts.model)
    data = property(lambda self: self.parts.data)
    optimizer = property(lambda self: self.parts.optimizer)
    precision = property(lambda self: self.parts.precision)
    device = property(lambda self: self.parts.device)

    def evaluate(self, split: str, mode: str = "auto") -> float:
        """Accuracy on ``split`` with the quantized layers in ``mode`` (auto = hard grid)."""
        p = self.parts
        return evaluate(
            p.model, p.data, split, int(p.settings.eval_batch_size), p.device, mode,
            self.step_fn.autocast(), p.dist,
        )  # fmt: skip

    def run_facts(self) -> dict[str, Any]:
        """Facts of the run for metrics.json that change while it trains."""
        return {"compiled": self.step_fn.compiled}

    def fit(self) -> dict[str, Any]:
        """Train (or resume), then test the best-validation model; return the metrics."""
        p = self.parts
        if p.resume:
            self.checkpoints.resume(self)
        if self.progress.step > 0:  # calibrated before the checkpoint: only trackers observe
            set_observing(p.model, "train")
        reporter_cls = RunReporter if p.dist.is_main else SilentReporter
        facts = {**p.data.data_report(), "ranks": p.dist.world}
        self.reporter = reporter_cls(
            p.run.run_dir, p.run.fingerprint, p.run.identity, facts, p.device, p.run.config,
            purge_step=self.progress.step or None,
        )  # fmt: skip
        try:
            self._record(RunStatus.RUNNING)
            while self.progress.epoch < p.settings.epochs and not self._should_stop():
                if self._epoch():
                    break
            return final_test(self)
        except NonFiniteLoss as exc:
            self._record(RunStatus.FAILED, str(exc))
            raise
        finally:
            self.reporter.close()

    def _record(self, status: RunStatus, reason: str | None = None) -> RunRecord:
        assert self.reporter is not None
        return self.reporter.record(status, self.progress, reason, **self.run_facts())

    def _epoch(self) -> bool:
        """One epoch: train, validate, pick the best, checkpoint, report; True to stop."""
        p, prog, reporter = self.parts, self.progress, self.reporter
        assert reporter is not None
        t_epoch = time.perf_counter()
        train_loss, train_acc = self._train_epoch()
        val_acc = self.evaluate("val") if p.data.num_val else train_acc
        reporter.scalar("val/acc", val_acc, prog.step)
        if p.settings.histograms:
            reporter.histograms(p.model, prog.step)
        new_best = (
            p.model.estimator.is_final_form()
            and p.precision.satisfied()
            and val_acc > prog.best_val
        )
        if new_best:
            prog.best_val, prog.best_epoch = val_acc, prog.epoch
        prog.history.append(
            {
                "epoch": prog.epoch + 1,
                "train_loss": train_loss,
                "train_acc": train_acc,
                "val_acc": val_acc,
                # training progress at the epoch's last step: what the estimator's schedules
                # saw last (a tuner's pruning rule asks whether the deployed form was trained)
                "progress": (prog.step - 1) / self.total_steps,
                **p.precision.epoch_summary(),
            }
        )
        log.info(
            "epoch %d/%d  loss %.4f  train_acc %.4f  val_acc %.4f  (%.1fs)",
            prog.epoch + 1, p.settings.epochs, train_loss, train_acc, val_acc,
            time.perf_counter() - t_epoch,
        )  # fmt: skip
        prog.epoch += 1
        self.checkpoints.on_epoch_end(self, new_best)
        barrier(p.dist)  # the checkpoints are on disk before any rank reads them
        self._record(RunStatus.RUNNING)
        reporter.flush()
        fault_point(f"epoch:{prog.epoch}", p.run.run_dir)  # tests: die as if killed here
        return p.on_epoch is not None and bool(p.on_epoch(prog.history))

    def _train_epoch(self) -> tuple[float, float]:
        """One pass over the training batches; returns (mean loss, accuracy) over the ranks.
        Every ``log_every`` steps the window's loss, accuracy and the LR are logged."""
        p, prog = self.parts, self.progress
        p.model.train()
        window, epoch_sum = LossWindow(p.device), LossWindow(p.device)
        bar = progress_bar(p.settings.progress, p.dist, self.steps_per_epoch, prog.epoch,
                           p.settings.epochs)
        t0 = time.perf_counter()
        batches = p.data.train_batches(int(p.settings.batch_size), prog.epoch, p.run.seed, p.device)
        for i, (x, y) in enumerate(batches):
            out = self.step_fn(x, y, prog.step, self.total_steps)
            for k, v in out.schedule.items():
                self.reporter.scalar(f"train/{k}", float(v), prog.step)
            prog.step += 1
            window.add(out)
            epoch_sum.add(out)
            if prog.step % int(p.settings.log_every) == 0 or i + 1 == self.steps_per_epoch:
                self._log_window(window, out)
            if bar is not None:
                bar.update(1)
                if prog.step % 10 == 0:
                    bar.set_postfix(loss=f"{float(out.loss):.3f}")
        if bar is not None:
            bar.close()
        if p.device.type == "cuda":
            torch.cuda.synchronize()
        prog.train_time += time.perf_counter() - t0
        loss, correct, seen = epoch_sum.totals(p.dist)
        prog.samples += int(seen)
        epoch_loss = loss / max(seen, 1)
        if not math.isfinite(epoch_loss):
            raise NonFiniteLoss(self._nan_message())
        return epoch_loss, correct / max(seen, 1)

    def _log_window(self, window: LossWindow, out: StepResult) -> None:
        p, step = self.parts, self.progress.step
        loss, correct, seen = window.totals(p.dist)
        mean_loss = loss / seen
        if not math.isfinite(mean_loss):
            raise NonFiniteLoss(self._nan_message())
        self.reporter.scalar("train/loss", mean_loss, step)
        self.reporter.scalar("train/acc", correct / seen, step)
        self.reporter.scalar("train/lr", out.lr, step)
        for k, v in out.logs.items():  # device tensors: synced here, not every step
            self.reporter.scalar(f"train/{k}", float(v), step)
        p.precision.log(self.reporter.writer, step)
        window.reset()
        if p.settings.progress != "none" and not bar_wanted(p.settings.progress, p.dist):
            log.info(
                "epoch %d step %d/%d loss %.4f",
                self.progress.epoch + 1, step, self.total_steps, mean_loss,
            )  # fmt: skip

    def _should_stop(self) -> bool:
        """Early stop on a validation plateau: no better epoch for ``patience`` epochs.

        Read from the restored state alone, so a resumed run stops where the uncut one would.
        """
        patience, prog = self.parts.settings.patience, self.progress
        if patience is None or prog.best_epoch < 0:
            return False
        if prog.epoch - 1 - prog.best_epoch >= int(patience):
            log.info(
                "stopping early: val accuracy has not improved for %d epochs (best epoch %d)",
                patience,
                prog.best_epoch + 1,
            )
            return True
        return False

    def _nan_message(self) -> str:
        epoch, last = self.progress.epoch, self.checkpoints.last
        kept = (
            f"the last good checkpoint (epoch {epoch}) is kept in {last}"
            if last.is_file() else "no epoch had finished, so no checkpoint was written"
        )
        return (
            f"the training loss became NaN/inf in epoch {epoch + 1} (step {self.progress.step}): "
            f"lower trainer.lr (now {self.parts.settings.lr}) or set trainer.grad_clip; {kept}"
        )
