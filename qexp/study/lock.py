"""One call per study dir at a time (or per shard of it).

Two calls of `qexp study` on the same dir would both ask the same cells for tuning trials (a
cell's journal would end with more trials than the spec's budget) and train the same final
runs. So a call holds a lock in ``<study dir>/.locks/``: ``all`` for an unsharded call,
``shard-i-of-k`` for a shard. Shards of one study may run side by side when they split it the
same way (the same k: their cells are disjoint); an unsharded call may not run beside any
other call, nor a shard beside an unsharded call, the same shard or a shard of another k. The
locks are qexp's run-dir locks (qexp.rundir_lock): an exclusive file with a heartbeat,
dependable on cluster file systems, taken over when their holder is dead.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from qexp.errors import QexpError
from qexp.rundir_lock import LOCK_NAME, RunDirHeld, RunDirLock, read_lock

LOCKS_DIR = ".locks"


def lock_name(shard: tuple[int, int] | None) -> str:
    """The lock of an unsharded call (``all``) or of shard i of k."""
    return "all" if shard is None else f"shard-{shard[0]}-of-{shard[1]}"


def _k(name: str) -> str:
    """The k of a shard lock's name (``shard-i-of-k``)."""
    return name.rsplit("-of-", 1)[-1]


def _live_holder(folder: Path) -> str | None:
    """Who holds the lock in ``folder``, if a live process does."""
    found = read_lock(folder / LOCK_NAME)
    if found is None:
        return None
    holder, mtime = found
    if not RunDirLock(folder)._alive(holder, mtime):  # noqa: SLF001 - the same judgement
        return None
    return holder.describe() if holder is not None else "another process"


def _refusal(study_dir: Path, who: str, name: str) -> QexpError:
    what = "an unsharded call" if name == "all" else f"shard {name.removeprefix('shard-')}"
    return QexpError(
        f"study dir {study_dir} is being run by {who} ({what}): wait for it to finish or stop "
        "it; calls may share a dir only as different --shard i/k"
    )


@contextlib.contextmanager
def hold_study(study_dir: Path, shard: tuple[int, int] | None) -> Iterator[None]:
    """Hold the study dir (or one shard of it) for the block; a one-line QexpError naming the
    live holder when another call runs what this one would."""
    locks = Path(study_dir) / LOCKS_DIR
    name = lock_name(shard)
    try:
        lock = RunDirLock(locks / name).acquire()
    except RunDirHeld:
        raise _refusal(study_dir, _live_holder(locks / name) or "another process", name) from None
    try:
        others = [p for p in locks.iterdir() if p.is_dir() and p.name != name]
        for other in others:
            # shards of one k split the cells; shards of another k overlap them
            conflicts = name == "all" or other.name == "all" or _k(other.name) != _k(name)
            who = _live_holder(other) if conflicts else None
            if who is not None:
                raise _refusal(study_dir, who, other.name)
        yield
    finally:
        lock.release()
