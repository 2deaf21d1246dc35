"""One fault-injection seam for every kill / crash / resume test.

``QEXP_FAULT`` names a point in a run's life where the process dies as if killed (``kill``:
``os._exit(137)``, nothing flushed or cleaned up) or crashes (``crash``: an exception):

    QEXP_FAULT=kill@epoch:2           after epoch 2 (its checkpoint and metrics.json on disk)
    QEXP_FAULT=kill@start/tuning      when a run job starts in a run dir whose path contains
                                      "tuning" (e.g. a study right after its references)
    QEXP_FAULT=crash@epoch:1/seed3    a Python exception after epoch 1 of runs matching "seed3"
    QEXP_FAULT=pause@epoch:1          after epoch 1, write $QEXP_FAULT_GO.paused (holding the
                                      pid) and wait until the file $QEXP_FAULT_GO exists

Events: ``start`` (the job lifecycle, after the run dir is locked) and ``epoch:N`` (the trainer,
at the end of epoch N: ``checkpoints/last.pt`` and ``metrics.json`` written). Unset, it costs one
environment lookup.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

FAULT_ENV = "QEXP_FAULT"
#: the file a paused run waits for
GO_ENV = "QEXP_FAULT_GO"
#: exit status of a killed process (128 + SIGKILL), as a shell reports it
KILLED_STATUS = 137


class InjectedCrash(RuntimeError):
    """The exception ``crash@...`` raises."""


def fault_point(event: str, run_dir: Path) -> None:
    """Die here when ``QEXP_FAULT`` names ``event`` for ``run_dir``."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    action, _, rest = spec.partition("@")
    where, _, match = rest.partition("/")
    if where != event or (match and match not in str(run_dir)):
        return
    if action == "kill":
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(KILLED_STATUS)
    if action == "crash":
        raise InjectedCrash(f"{FAULT_ENV}={spec} at {event} in {run_dir}")
    if action == "pause":
        go = Path(os.environ[GO_ENV])
        Path(f"{go}.paused").write_text(str(os.getpid()))
        while not go.exists():
            time.sleep(0.02)
        return
    raise ValueError(f"{FAULT_ENV}={spec!r}: use kill|crash|pause@EVENT[/MATCH]")
