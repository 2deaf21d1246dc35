"""What a run reports: TensorBoard events and ``metrics.json``, written by rank 0 only.

The trainer hands values to its reporter; on ranks other than 0 the reporter is a
:class:`SilentReporter`, which builds the same records (every rank returns the run's metrics)
but writes nothing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch.utils.tensorboard import SummaryWriter

from qexp.estimators.model import QuantModel
from qexp.record import RunRecord, RunStatus, write_record
from qexp.report.hparams import write_hparams
from qexp.train.memory import peak_memory
from qexp.train.progress import Progress


class _NullWriter:
    """Stands in for the TensorBoard writer where nothing is written: records nothing."""

    def __getattr__(self, name: str):
        return lambda *args, **kwargs: None


class RunReporter:
    """TensorBoard and ``metrics.json`` of one run.

    Args:
        run_dir: where both go.
        fingerprint: the run's config fingerprint (in every record).
        identity: the fields that head ``metrics.json`` (estimator, bits, seed...).
        facts: constant facts of the run added to every record (data report, ranks).
        config: the run's resolved config, the last entry of every record.
        device: for the peak-memory fields.
        purge_step: a resumed run's step: TensorBoard events after it (from the cut-off part
            of the run) are dropped.
    """

    writes = True

    def __init__(
        self,
        run_dir: Path,
        fingerprint: str,
        identity: dict[str, Any],
        facts: dict[str, Any],
        device: torch.device,
        config: dict[str, Any] | None = None,
        purge_step: int | None = None,
    ) -> None:
        self.run_dir, self.fingerprint, self.device = run_dir, fingerprint, device
        self.identity, self.facts, self.config = identity, facts, config or {}
        self.writer: Any = self._open_writer(purge_step)

    def _open_writer(self, purge_step: int | None) -> Any:
        return SummaryWriter(str(self.run_dir), purge_step=purge_step)

    def scalar(self, tag: str, value: float, step: int) -> None:
        """One TensorBoard scalar."""
        self.writer.add_scalar(tag, value, step)

    def histograms(self, model: QuantModel, step: int) -> None:
        """Each quantized layer's latent weights as a TensorBoard histogram."""
        for name, layer in model.layers():
            self.writer.add_histogram(
                f"weights/{name}", layer.weight.detach().float().cpu(), step
            )

    def record(
        self,
        status: RunStatus,
        progress: Progress,
        reason: str | None = None,
        **results: Any,
    ) -> RunRecord:
        """Write (rank 0) and return ``metrics.json``: identity, progress, facts, peak memory
        and ``results``."""
        data = {
            **self.identity,
            **progress.summary(),
            **self.facts,
            **peak_memory(self.device),
            **results,
            "config": self.config,
        }
        record = RunRecord(status, reason, self.fingerprint, data)
        if self.writes:
            write_record(self.run_dir, record)
        return record

    def hparams(self, metrics: dict[str, Any], step: int) -> None:
        """The run's HParams experiment and Text-tab summary (qexp.report.hparams)."""
        if self.writes:
            write_hparams(self.writer, metrics, self.run_dir, step)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class SilentReporter(RunReporter):
    """The reporter of ranks other than 0: same records, no files."""

    writes = False

    def _open_writer(self, purge_step: int | None) -> Any:
        return _NullWriter()
