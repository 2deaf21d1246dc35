"""One writer per run dir: a lock file created with O_EXCL and kept alive by a heartbeat.

Why a lock *file* and not fcntl/flock: on the file systems clusters share between nodes,
fcntl/flock locks are not dependable. BeeGFS keeps them node-local unless global locks are
switched on, Lustre needs the ``flock`` mount option (``localflock`` is node-local), and NFS
locks go through a lock daemon (v3) or leases (v4) whose recovery after a lost client depends on
the server. An exclusive create (``O_CREAT | O_EXCL``) is atomic on local disks, NFSv3+, Lustre,
GPFS and BeeGFS alike, so that is all this module relies on for mutual exclusion.

The lock file ``<run dir>/.qexp.lock`` holds the holder's pid, host, machine identity and start
time; a daemon thread touches it every :data:`HEARTBEAT_S` seconds. A second process that finds
it decides whether the holder is alive:

* same machine (same host name, boot id and pid namespace): the pid must exist and have the
  start time written in the lock (pid reuse after a SIGKILL is caught); a dead holder's lock is
  taken over at once, and a live one is respected even if its heartbeat stalled (e.g. SIGSTOP);
* any other machine: only the heartbeat can tell. The lock is stale when its mtime is older than
  :data:`STALE_S` seconds (a dozen missed heartbeats). Ages are measured against the mtime of a
  probe file just created next to it, i.e. in the file system's own clock (the NFS server's),
  so clock skew between nodes does not matter. Opening the file before ``fstat`` makes NFS
  revalidate its attributes (close-to-open consistency) instead of using cached ones.

Taking over a stale lock goes through a short-lived ``.qexp.lock.break`` file (also O_EXCL), so
that two processes that both judged the lock stale cannot delete each other's fresh locks.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import signal
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from qexp.errors import QexpError

log = logging.getLogger("qexp")

LOCK_NAME = ".qexp.lock"
#: seconds between two touches of the lock file by its holder
HEARTBEAT_S = 10.0
#: a lock of another machine whose heartbeat is this old (in seconds) belongs to a dead process
STALE_S = 120.0
#: a takeover in progress (the .break file) older than this was cut off: remove it
BREAK_STALE_S = 30.0
_ATTEMPTS = 20
#: how long a lock file that cannot be parsed yet may still be in the middle of being written
_WRITING_GRACE_S = 2.0


class RunDirHeld(QexpError):
    """Another live process holds the run dir."""


@dataclass(frozen=True)
class Holder:
    """Who holds a run dir, as written in its lock file."""

    token: str  # unique per acquisition
    pid: int
    host: str
    machine: str  # host + boot id + pid namespace: pids are comparable only within one
    pid_start: str | None  # the process's start time in clock ticks since boot (Linux)
    started_at: float  # wall-clock time the lock was taken

    def describe(self) -> str:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started_at))
        return f"pid {self.pid} on {self.host} (running since {when})"


def _read_text(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def machine_id() -> str:
    """Identity within which pids name the same processes: host, boot and pid namespace."""
    boot = _read_text("/proc/sys/kernel/random/boot_id") or "-"
    try:
        pidns = os.readlink("/proc/self/ns/pid")
    except OSError:
        pidns = "-"
    return f"{socket.gethostname()}|{boot}|{pidns}"


def pid_start(pid: int) -> str | None:
    """Start time of process ``pid`` (field 22 of /proc/<pid>/stat); None where unknown."""
    text = _read_text(f"/proc/{pid}/stat")
    if not text or ")" not in text:
        return None
    fields = text.rsplit(")", 1)[1].split()
    return fields[19] if len(fields) > 19 else None  # field 22 overall, 20th after the name


def pid_alive(pid: int, start: str | None) -> bool:
    """Whether process ``pid`` exists and, where known, started at ``start``."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by another user
    except OSError:
        return False
    if start is None:
        return True
    now = pid_start(pid)
    return now is None or now == start


def _fs_now(folder: Path) -> float:
    """The current time in the clock of the file system holding ``folder``."""
    try:
        fd, name = tempfile.mkstemp(prefix=LOCK_NAME + ".now-", dir=folder)
    except OSError:
        return time.time()
    try:
        return os.fstat(fd).st_mtime
    finally:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(name)


def read_lock(path: Path) -> tuple[Holder | None, float] | None:
    """(holder or None if unreadable, mtime) of a lock file; None if there is no lock file."""
    try:
        fd = os.open(path, os.O_RDONLY)  # open (not stat) so NFS fetches fresh attributes
    except FileNotFoundError:
        return None
    try:
        mtime = os.fstat(fd).st_mtime
        raw = os.read(fd, 65536)
    finally:
        os.close(fd)
    try:
        holder = Holder(**json.loads(raw))
    except (ValueError, TypeError):
        holder = None  # being written right now, or cut off while it was written
    return holder, mtime


class RunDirLock:
    """Exclusive lock on one run dir (see the module docstring for how it works)."""

    def __init__(
        self, run_dir: Path | str, heartbeat_s: float = HEARTBEAT_S, stale_s: float = STALE_S
    ) -> None:
        self.run_dir = Path(os.path.abspath(run_dir))
        self.path = self.run_dir / LOCK_NAME
        self.heartbeat_s = heartbeat_s
        self.stale_s = stale_s
        self.holder: Holder | None = None
        self.lost = False  # set when another process took the lock from under us
        self.took_over: str | None = None  # whose stale lock this one replaced
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- judging an existing lock -----------------------------------------------------------
    def _alive(self, holder: Holder | None, mtime: float) -> bool:
        if holder is not None and holder.machine == machine_id():
            return pid_alive(holder.pid, holder.pid_start)
        return _fs_now(self.run_dir) - mtime < self.stale_s

    def _held_error(self, holder: Holder | None, mtime: float) -> RunDirHeld:
        same_machine = holder is not None and holder.machine == machine_id()
        age = 0.0 if same_machine else max(0.0, _fs_now(self.run_dir) - mtime)
        if holder is None:
            who = f"another process (unreadable {self.path}, touched {age:.0f} s ago)"
            todo = f"if no run uses it, delete {self.path}"
        elif same_machine:
            who = holder.describe()
            todo = f"wait for it to finish or stop it (kill {holder.pid})"
        else:
            who = f"{holder.describe()}, last heartbeat {age:.0f} s ago"
            todo = (
                f"wait for it to finish or stop it on {holder.host} (a lock whose heartbeat "
                f"stops for {self.stale_s:.0f} s is taken over)"
            )
        return RunDirHeld(
            f"run dir {self.run_dir} is in use by {who}: {todo}, or use another run dir"
        )

    def _break(self, seen: tuple[Holder | None, float]) -> None:
        """Delete the stale lock ``seen`` unless someone replaced it meanwhile."""
        breaker = self.path.with_name(LOCK_NAME + ".break")
        try:
            fd = os.open(breaker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            found = read_lock(breaker)
            if found and _fs_now(self.run_dir) - found[1] > BREAK_STALE_S:
                with contextlib.suppress(OSError):
                    os.unlink(breaker)  # a takeover that was itself cut off
            time.sleep(0.05)
            return
        try:
            now = read_lock(self.path)
            same = now is not None and (
                now[0] == seen[0] if seen[0] is not None else now[0] is None and now[1] == seen[1]
            )
            if same:
                self.took_over = seen[0].describe() if seen[0] else "an unreadable lock"
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path)
        finally:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(breaker)

    # -- taking and giving back -------------------------------------------------------------
    def acquire(self) -> RunDirLock:
        """Take the lock; raise RunDirHeld naming the holder if a live process has it."""
        try:
            return self._acquire()
        except RunDirHeld:
            raise
        except OSError as exc:
            raise QexpError(
                f"cannot lock run dir {self.run_dir} ({exc.strerror or exc}): choose a writable "
                "hydra.run.dir (or hydra.sweep.dir)"
            ) from None

    def _acquire(self) -> RunDirLock:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        unreadable_since = None
        for _ in range(_ATTEMPTS):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                found = read_lock(self.path)
                if found is None:
                    continue  # released meanwhile
                holder, mtime = found
                if holder is None and self._alive(None, mtime):
                    # a fresh lock still being written: give its writer a moment
                    unreadable_since = unreadable_since or time.monotonic()
                    if time.monotonic() - unreadable_since < _WRITING_GRACE_S:
                        time.sleep(0.1)
                        continue
                if self._alive(holder, mtime):
                    raise self._held_error(holder, mtime) from None
                self._break(found)
                continue
            self.holder = Holder(
                token=uuid.uuid4().hex,
                pid=os.getpid(),
                host=socket.gethostname(),
                machine=machine_id(),
                pid_start=pid_start(os.getpid()),
                started_at=time.time(),
            )
            try:
                os.write(fd, json.dumps(asdict(self.holder)).encode())
                os.fsync(fd)
            finally:
                os.close(fd)
            self._start_heartbeat()
            return self
        found = read_lock(self.path)
        raise self._held_error(*(found or (None, time.time())))

    def owned(self) -> bool:
        """Whether the lock file on disk is still this lock's."""
        found = read_lock(self.path)
        return (
            self.holder is not None
            and found is not None
            and found[0] is not None
            and found[0].token == self.holder.token
        )

    def _start_heartbeat(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._beat, name=f"qexp-lock-heartbeat {self.run_dir}", daemon=True
        )
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                if not self.owned():
                    self.lost = True
                    log.error(
                        "run dir %s: the lock was taken over by another process (this one "
                        "looked dead to it); results written from now on may be mixed",
                        self.run_dir,
                    )
                    return
                os.utime(self.path)
            except OSError as exc:  # a flaky network file system: try again next beat
                log.warning("run dir %s: lock heartbeat failed: %s", self.run_dir, exc)

    def release(self) -> None:
        """Stop the heartbeat and delete the lock file if it is still ours."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        self._thread = None
        if self.holder is None or self.holder.pid != os.getpid():
            return  # not taken, or a forked child (e.g. a data worker) exiting
        if self.owned():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
        self.holder = None

    def __enter__(self) -> RunDirLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


# -- the run dirs this process holds --------------------------------------------------------
_HELD: dict[Path, RunDirLock] = {}


def take_run_dir(run_dir: Path | str) -> RunDirLock:
    """Lock ``run_dir`` for this process (or return the lock it already holds).

    The lock stays held until :func:`hold_run_dir` around the run ends, or the process exits.
    """
    key = Path(os.path.abspath(run_dir))
    lock = _HELD.get(key)
    if lock is None or lock.holder is None:
        lock = RunDirLock(key).acquire()
        _HELD[key] = lock
    return lock


@atexit.register
def _release_all() -> None:
    for lock in list(_HELD.values()):
        lock.release()
    _HELD.clear()


def _raise_system_exit(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def not_first_rank() -> bool:
    """Whether this process is a rank other than 0 of a data-parallel run (torchrun's RANK, or
    Slurm's task id when a job runs several tasks)."""
    if "RANK" in os.environ:
        return int(os.environ["RANK"]) > 0
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        return int(os.environ.get("SLURM_PROCID", "0")) > 0
    return False


@contextlib.contextmanager
def hold_run_dir(run_dir: Path | str) -> Iterator[RunDirLock]:
    """Hold ``run_dir`` for the duration of the block (taking it unless already held).

    SIGTERM (e.g. ``kill``, Slurm's time limit) is turned into SystemExit while the block runs,
    where nobody else handles it, so that the lock is given back instead of left to go stale.
    """
    if not_first_rank():  # rank 0 of a data-parallel run holds the dir for all its ranks
        yield None  # type: ignore[misc]
        return
    lock = take_run_dir(run_dir)
    if lock.took_over:  # logged here, where the run's log file is open
        log.warning("run dir %s: took over the stale lock of %s", lock.run_dir, lock.took_over)
    sigterm = None
    main = threading.current_thread() is threading.main_thread()
    if main and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        sigterm = signal.signal(signal.SIGTERM, _raise_system_exit)
    try:
        yield lock
    finally:
        if sigterm is not None:
            signal.signal(signal.SIGTERM, sigterm)
        _HELD.pop(lock.run_dir, None)
        lock.release()
