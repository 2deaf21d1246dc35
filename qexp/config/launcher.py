"""Values of ``hydra.launcher`` that its plugin would only reject (or misuse) once jobs start.

Hydra's launcher schemas check types when the config is composed; the ranges are checked here,
in preflight, so that ``hydra.launcher.n_jobs=0`` ends in one line instead of a joblib traceback
after the sweep has begun.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from qexp.errors import QexpError


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _fail(key: str, value: Any, allowed: str) -> None:
    raise QexpError(f"hydra.launcher.{key}={value!r} is not allowed: use {allowed}")


def _check_joblib(node: Mapping[str, Any]) -> None:
    n = node.get("n_jobs")
    if not _is_int(n) or n == 0:
        _fail("n_jobs", n, "N >= 1 jobs side by side, or -1 (one per CPU), -2 (all but one)...")
    timeout = node.get("timeout")
    if timeout is not None and (not _is_number(timeout) or timeout <= 0):
        _fail("timeout", timeout, "null (no limit) or a positive number of seconds")
    if node.get("backend") not in (None, "loky", "multiprocessing"):
        # the threading backend would run the jobs in one process: torch's thread count, the
        # run-dir locks and Hydra's logging are per process
        _fail("backend", node.get("backend"), "null | loky | multiprocessing")
    if node.get("prefer") not in (None, "processes"):
        _fail("prefer", node.get("prefer"), "processes (each job needs its own process)")
    if node.get("require") is not None:
        _fail("require", node.get("require"), "null (each job needs its own process)")
    verbose = node.get("verbose", 0)
    if not _is_int(verbose) or verbose < 0:
        _fail("verbose", verbose, "an integer >= 0")
    batch = node.get("batch_size", "auto")
    if batch != "auto" and not (str(batch).isdigit() and int(batch) >= 1):
        _fail("batch_size", batch, "auto or an integer >= 1")


def _positive_or_null(node: Mapping[str, Any], key: str, zero_ok: bool = False) -> None:
    value = node.get(key)
    low = 0 if zero_ok else 1
    if value is not None and (not _is_int(value) or value < low):
        _fail(key, value, f"null or an integer >= {low}")


def _check_submitit(node: Mapping[str, Any]) -> None:
    timeout = node.get("timeout_min")
    if not _is_int(timeout) or timeout < 1:
        _fail("timeout_min", timeout, "a whole number of minutes >= 1")
    # qexp trains in one process per job: more tasks or nodes would start copies of the same
    # run in the same run dir
    for key in ("tasks_per_node", "nodes"):
        if node.get(key, 1) != 1:
            _fail(key, node.get(key), "1 (a qexp run is one process)")
    _positive_or_null(node, "cpus_per_task")
    _positive_or_null(node, "mem_gb")
    _positive_or_null(node, "gpus_per_node", zero_ok=True)
    for key in ("cpus_per_gpu", "gpus_per_task"):
        _positive_or_null(node, key)
    for key, low in (("array_parallelism", 1), ("max_num_timeout", 0), ("signal_delay_s", 0)):
        value = node.get(key, low)
        if not _is_int(value) or value < low:
            _fail(key, value, f"an integer >= {low}")


def check_launcher(node: Mapping[str, Any] | None) -> None:
    """Raise QexpError on the first value of ``hydra.launcher`` its launcher cannot use."""
    if not node:
        return
    target = str(node.get("_target_", "")).lower()
    if "joblib" in target:
        _check_joblib(node)
    elif "submitit" in target:
        _check_submitit(node)
