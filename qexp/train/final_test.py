"""The final test of a trained run: the best checkpoint on the test split, hard-quantized.

``test_acc`` is the accuracy of the truly quantized network (weights and activations on their
grids); ``test_acc_latent`` the latent float weights with quantized activations; estimators
with a soft training forward also get ``test_acc_soft`` and the soft-hard gap. Text runs
(token inputs) add ``test_loss`` (nats per character) and ``test_bpc`` (bits per character);
their ``test_acc`` is next-character accuracy. The per-layer level table proves the grid: a
layer with more distinct levels than its bits allow fails the run. A tuning run (test split
sealed) ends without a test.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from qexp.quant.cost import cost_metrics
from qexp.record import RunStatus
from qexp.train.evaluate import evaluate_loss
from qexp.train.inspect_levels import layer_table, weight_kb

log = logging.getLogger("qexp")


def text_metrics(trainer: Any) -> dict[str, float]:
    """The hard-quantized network's next-character accuracy (``test_acc``), mean loss in nats
    per character (``test_loss``) and bits per character (``test_bpc`` = loss / ln 2) over the
    test windows, from one pass."""
    p = trainer.parts
    result = evaluate_loss(
        p.model, p.data, "test", int(p.settings.eval_batch_size), p.device, "auto",
        trainer.step_fn.autocast(), p.dist,
    )  # fmt: skip
    return {
        "test_acc": result.acc,
        "test_loss": result.loss,
        "test_bpc": result.loss / math.log(2),
    }


def final_test(trainer: Any) -> dict[str, Any]:
    """Test the trainer's best checkpoint, write the final ``metrics.json`` (and the HParams
    summary), and return the metrics."""
    model, data, reporter = trainer.model, trainer.data, trainer.reporter
    progress, step = trainer.progress, trainer.progress.step
    trainer.checkpoints.load_best(model)
    if data.test_sealed:  # a tuning run: validation only, the test split stays unread
        record = reporter.record(
            RunStatus.COMPLETED, progress, "tuning run: not tested", **trainer.run_facts()
        )
        return record.to_json()
    extra: dict[str, Any] = {}
    if data.info.input_kind == "tokens":  # language modelling: next-character loss as well
        text = text_metrics(trainer)
        test_acc = text["test_acc"]
        extra.update(test_loss=text["test_loss"], test_bpc=text["test_bpc"])
        reporter.scalar("test/loss", text["test_loss"], step)
        reporter.scalar("test/bpc", text["test_bpc"], step)
    else:
        test_acc = trainer.evaluate("test", "auto")
    test_acc_latent = trainer.evaluate("test", "latent")
    if model.estimator.has_soft_forward:
        soft = trainer.evaluate("test", "soft")
        extra["test_acc_soft"] = soft
        extra["soft_hard_gap"] = soft - test_acc
        reporter.scalar("test/acc_soft", soft, step)
        reporter.scalar("test/soft_hard_gap", soft - test_acc, step)
    x, _ = next(iter(data.eval_batches("test", 256, trainer.device)))
    table = layer_table(model.net, x)
    plan = trainer.parts.layer_plan
    if plan is not None:  # which rule set each layer (layers.overrides)
        table = plan.annotate(table)
    honest = all(row["ok"] for row in table)
    if not honest:
        log.error(
            "layers with more levels than their bits allow: %s",
            [r["name"] for r in table if not r["ok"]],
        )
    kb = weight_kb(table)
    reporter.scalar("test/acc", test_acc, step)
    reporter.scalar("test/acc_latent", test_acc_latent, step)
    status, reason = RunStatus.COMPLETED, None
    if not honest:
        status, reason = RunStatus.FAILED, "levels exceed bit width"
    elif trainer.precision.unmet():  # no epoch met the budget: the last one is reported
        reason = trainer.precision.unmet()
    extra.update(trainer.precision.final(reporter.writer, table, step))
    extra.update(cost_metrics(model.net, x))
    extra.update(model.estimator.state_summary())
    extra["passes_per_step"] = model.estimator.passes_per_step()  # a study's cost columns
    record = reporter.record(
        status,
        progress,
        reason,
        **trainer.run_facts(),
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
    peak = record.get("peak_rss_mb")
    gpu = record.get("peak_gpu_mb")
    log.info("peak memory: %.0f MB resident%s", peak, f", {gpu:.0f} MB GPU" if gpu else "")
    metrics = record.to_json()
    reporter.hparams(metrics, step)
    return metrics
