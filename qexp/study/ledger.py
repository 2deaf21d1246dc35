"""How long a study took, and on what: one record per call of ``qexp study`` (a piece).

A study runs in pieces (shards, sessions, machines). Each call writes ``pieces/<id>.json`` in
the study dir: when it started, the machine (CPUs, GPUs, torch), the workers and threads, and
a heartbeat (``last_seen``) refreshed every minute while it runs, so a piece that is killed
still tells its wall time to within a minute. One small file per piece, so the records of
shards run on several machines merge in git without conflicts. The report sums them.
"""

from __future__ import annotations

import logging
import os
import platform
import threading
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from qexp.record import read_json, write_json

log = logging.getLogger("qexp")

PIECES_DIR = "pieces"
#: seconds between two heartbeats of a running piece
HEARTBEAT_S = 60.0


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def cpu_model() -> str:
    """The CPU's model name (Linux /proc/cpuinfo, else what platform knows)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe_machine() -> dict[str, Any]:
    """The facts of this machine a reader needs to weigh a study's wall time."""
    import torch  # here, not at import: the ledger is read by reports without torch work

    gpus = (
        [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if torch.cuda.is_available()
        else []
    )
    return {
        "cpus": os.cpu_count(),
        "cpu": cpu_model(),
        "gpus": gpus,
        "torch": torch.__version__.split("+")[0],
        "system": platform.system(),
    }


def machine_words(machine: dict[str, Any]) -> str:
    """A machine record as a short phrase: "2 CPUs (model), no GPU" or "... 1x H100"."""
    gpus = machine.get("gpus") or []
    gpu_text = ", ".join(sorted({f"{gpus.count(g)}x {g}" for g in gpus})) if gpus else "no GPU"
    return f"{machine.get('cpus')} CPUs ({machine.get('cpu')}), {gpu_text}"


class PieceLog:
    """Context manager recording one call of a study in ``<study_dir>/pieces/``."""

    def __init__(self, study_dir: Path, execution: dict[str, Any]) -> None:
        started = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        self.path = Path(study_dir) / PIECES_DIR / f"{started}-{uuid.uuid4().hex[:6]}.json"
        self.record: dict[str, Any] = {
            "id": self.path.stem,
            "started": _now(),
            "last_seen": _now(),
            "finished": False,
            "machine": describe_machine(),
            "execution": execution,
        }
        self._t0 = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True)

    def _write(self) -> None:
        self.record["last_seen"] = _now()
        self.record["wall_s"] = round(time.monotonic() - self._t0, 1)
        try:
            write_json(self.record, self.path)
        except OSError as exc:  # a full disk must not stop the study (nor hide its error)
            log.warning("study piece record %s not written: %s", self.path, exc)

    def as_finished(self) -> dict[str, Any]:
        """The record as it will read when this call ends well (for a report written at
        the call's end)."""
        wall = round(time.monotonic() - self._t0, 1)
        return {**self.record, "last_seen": _now(), "wall_s": wall, "finished": True}

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            self._write()

    def __enter__(self) -> PieceLog:
        self._write()
        self._thread.start()
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.record["finished"] = exc_type is None
        self._write()


def read_pieces(study_dir: Path, current: PieceLog | None = None) -> list[dict[str, Any]]:
    """Every piece record of a study, oldest first (unreadable files are skipped); the
    ``current`` call's record as it will end."""
    folder = Path(study_dir) / PIECES_DIR
    records = [read_json(p) for p in sorted(folder.glob("*.json"))] if folder.is_dir() else []
    if current is not None:
        here = current.record["id"]
        records = [r for r in records if r and r.get("id") != here] + [current.as_finished()]
    return sorted((r for r in records if r), key=lambda r: str(r.get("started")))


def run_train_seconds(folder: Path) -> tuple[int, float]:
    """(runs, summed ``train_time_s``) of the run records under ``folder`` (e.g. tuning/)."""
    runs, seconds = 0, 0.0
    for path in Path(folder).rglob("metrics.json"):
        record = read_json(path)
        if record and record.get("train_time_s") is not None:
            runs += 1
            seconds += float(record["train_time_s"])
    return runs, seconds
