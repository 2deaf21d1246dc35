"""The run record: what a run dir's ``metrics.json`` says, read and written in one place.

Every part of qexp that asks "is this run finished, and with which config?" (sweeps, the
full-precision partner cache, ``qexp compare``) reads the record through :func:`read_record`;
every part that writes it goes through :func:`write_record` or :func:`mark_failed`. The module
imports no torch, so reports and sweep bookkeeping stay light.

A record has a status (:class:`RunStatus`: running, completed or failed), an optional one-line
``reason`` (why it failed, or a caveat on a completed run such as an unmet memory budget), the
config fingerprint of the run, and the run's metrics.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import IO, Any

METRICS_FILE = "metrics.json"

#: config keys that may differ between a run and its resumption (they change no result)
RESUME_FREE_KEYS = (
    "resume", "trainer.device", "trainer.threads", "trainer.progress", "trainer.compile"
)
#: options added after runs were recorded, with the value that reproduces what runs did before
#: the option existed: a config holding that value hashes as if the key were absent, so a new
#: option does not orphan the records of a study run in pieces across code versions. A new
#: option whose neutral value is its default goes here.
FINGERPRINT_NEUTRAL: dict[str, Any] = {
    "layers.matmul_bits": None,  # activation-activation products stay float
    "layers.embed_bits": None,  # embeddings stay float
}
#: config keys that change no result at all (reports neither group nor label runs by them)
RESULT_FREE_KEYS = (*RESUME_FREE_KEYS, "trainer.log_every", "trainer.histograms")


class RunStatus(str, Enum):
    """Where a run stands."""

    RUNNING = "running"  # training, or cut off (a checkpoint may allow resuming)
    COMPLETED = "completed"  # tested; its numbers are final
    FAILED = "failed"  # stopped by an error; ``reason`` says which


@dataclass
class RunRecord:
    """The content of one ``metrics.json``.

    ``data`` holds everything else the run reports (identity, accuracies, history, the
    per-layer table); :meth:`get` reads it like a dict.
    """

    status: RunStatus
    reason: str | None = None
    config_hash: str | None = None
    data: dict[str, Any] = field(default_factory=dict)

    @property
    def completed(self) -> bool:
        """Whether the run finished and was tested."""
        return self.status is RunStatus.COMPLETED

    def get(self, key: str, default: Any = None) -> Any:
        """A reported value (``status``, ``reason`` and ``config_hash`` included)."""
        if key == "status":
            return self.status.value
        if key in ("reason", "config_hash"):
            value = getattr(self, key)
            return default if value is None else value
        return self.data.get(key, default)

    def to_json(self) -> dict[str, Any]:
        """The JSON object written to ``metrics.json``."""
        head = {"status": self.status.value, "reason": self.reason, "config_hash": self.config_hash}
        return {**head, **{k: v for k, v in self.data.items() if k not in head}}

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> RunRecord:
        """Parse a ``metrics.json`` object (older files wrote ``"completed: <reason>"``)."""
        status, reason = parse_status(obj.get("status"))
        reason = obj.get("reason") or reason or obj.get("error")
        rest = {k: v for k, v in obj.items() if k not in ("status", "reason", "config_hash")}
        return cls(status, reason, obj.get("config_hash"), rest)


def parse_status(raw: Any) -> tuple[RunStatus, str | None]:
    """(status, reason) from a status string; unknown or missing values count as failed."""
    text = str(raw or "").strip()
    head, _, tail = text.partition(":")
    try:
        return RunStatus(head.strip()), tail.strip() or None
    except ValueError:
        return RunStatus.FAILED, f"unreadable status {text!r}" if text else "no status"


# -- files -------------------------------------------------------------------------------------
def atomic_write(path: Path, write: Callable[[IO[bytes]], Any]) -> None:
    """Write through ``write(file)`` to a temp file beside ``path``, fsync, then rename.

    A crash at any point leaves either the old file or the new one, never a torn file.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; results are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(obj: Any, path: Path) -> None:
    """Write ``obj`` as indented JSON atomically."""
    data = (json.dumps(obj, indent=2) + "\n").encode()
    atomic_write(path, lambda f: f.write(data))


def read_json(path: Path) -> dict[str, Any] | None:
    """The JSON object in ``path``; None if missing, unreadable or not an object."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def read_record(run_dir: Path) -> RunRecord | None:
    """The record of ``run_dir``; None when it has no readable ``metrics.json``."""
    obj = read_json(Path(run_dir) / METRICS_FILE)
    return RunRecord.from_json(obj) if obj is not None else None


def write_record(run_dir: Path, record: RunRecord) -> None:
    """Write the record of ``run_dir`` atomically (the only writer of ``metrics.json``)."""
    write_json(record.to_json(), Path(run_dir) / METRICS_FILE)


def mark_failed(run_dir: Path, reason: str, config_hash: str | None = None) -> None:
    """Record that the run in ``run_dir`` failed, keeping what its record already holds.

    A record that is already final (completed or failed) is left alone: the trainer's own word
    on how the run ended wins over a later, vaguer one. So is the record of another config
    (``config_hash`` given and different): a refusal to touch a run dir must not mark its run.
    """
    old = read_record(run_dir)
    if old is not None and old.status is not RunStatus.RUNNING:
        return
    if old is not None and config_hash and old.config_hash not in (None, config_hash):
        return
    record = old or RunRecord(RunStatus.FAILED)
    record.status, record.reason = RunStatus.FAILED, reason
    record.config_hash = record.config_hash or config_hash
    write_record(run_dir, record)


# -- config fingerprint --------------------------------------------------------------------------
def config_fingerprint(config: Mapping[str, Any]) -> str:
    """Hash of the resolved run config minus the keys that change no result (resume, device...).

    Two runs with the same fingerprint compute the same numbers; a run dir is resumed, skipped
    or reused (partner cache) only by a config with its fingerprint. ``config`` is the plain
    resolved config (the composition root converts Hydra's).
    """
    plain = json.loads(json.dumps(config))  # a deep copy we may edit
    plain.pop("hydra", None)
    for key in RESUME_FREE_KEYS:
        node, _, leaf = key.partition(".")
        if leaf:
            (plain.get(node) or {}).pop(leaf, None)
        else:
            plain.pop(node, None)
    for key, neutral in FINGERPRINT_NEUTRAL.items():
        node, _, leaf = key.partition(".")
        parent = plain.get(node) if leaf else plain
        name = leaf or node
        if isinstance(parent, dict) and name in parent and parent[name] == neutral:
            del parent[name]
    return hashlib.sha256(json.dumps(plain, sort_keys=True).encode()).hexdigest()[:16]
