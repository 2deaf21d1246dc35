"""Unreadable image files in a folder data set: stop naming the file, or skip and count them.

Two places find them. An up-front scan opens every file the run will use and runs PIL's
``verify()``: it reads headers (and checks PNG chunk checksums) without decoding pixels, which
catches empty, non-image and truncated PNG files before training. Decoding can still fail later
(a JPEG cut off in its pixel data has an intact header), so loading is guarded as well: the
DataLoader worker hands back an :class:`Unreadable` record instead of raising, and the main
process applies the rule. That keeps the error to one line (a worker's exception would come
back wrapped in its traceback) and lets ``skip`` drop the sample from its batch.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal, NamedTuple

import torch
from torch.utils.data import default_collate

from qexp.errors import QexpError

log = logging.getLogger("qexp")

BadImageRule = Literal["error", "skip"]
RULES = ("error", "skip")
#: at most this many skipped files are listed in metrics.json (all are counted)
LISTED = 1000


class Unreadable(NamedTuple):
    """An image file PIL cannot read, and why."""

    path: str
    reason: str


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}"[:200] if text else type(exc).__name__


# PIL's errors for broken files: OSError (incl. UnidentifiedImageError, truncated data),
# SyntaxError (broken PNG chunks), ValueError, and its decompression-bomb guard.
def _pil_errors() -> tuple[type[BaseException], ...]:
    from PIL import Image

    return (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def verify_file(path: str) -> Unreadable | None:
    """Open ``path`` with PIL and verify it without decoding; None if it looks readable."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.verify()
    except _pil_errors() as exc:
        return Unreadable(path, _reason(exc))
    return None


def scan(paths: Iterable[str], threads: int) -> list[Unreadable]:
    """The unreadable files among ``paths`` (threads overlap the file-system round trips)."""
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        return [bad for bad in pool.map(verify_file, paths) if bad is not None]


def load_or_flag(loader: Callable[[str], Any], path: str) -> Any:
    """``loader(path)``, or an :class:`Unreadable` record when the file cannot be decoded."""
    try:
        return loader(path)
    except _pil_errors() as exc:
        return Unreadable(path, _reason(exc))


def collate_readable(
    items: list[Any],
) -> tuple[torch.Tensor | None, torch.Tensor | None, list[Unreadable]]:
    """DataLoader collate: (images, labels) of the readable samples, plus the unreadable ones."""
    bad = [item for item in items if isinstance(item, Unreadable)]
    good = [item for item in items if not isinstance(item, Unreadable)]
    if not good:
        return None, None, bad
    x, y = default_collate(good)
    return x, y, bad


class BadImages:
    """Applies ``dataset.bad_images`` and keeps the record written to metrics.json.

    Args:
        rule: "error" stops with the first unreadable file's path; "skip" leaves such files out,
            logs each once and counts them.
    """

    def __init__(self, rule: str) -> None:
        if rule not in RULES:
            raise QexpError(f"dataset.bad_images={rule!r} is not allowed: use error | skip")
        self.rule = rule
        self.skipped: dict[str, str] = {}  # path -> reason

    def _error(self, bad: list[Unreadable], when: str) -> QexpError:
        first = bad[0]
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        return QexpError(
            f"unreadable image {first.path}{more} {when}: {first.reason}; replace or delete it, "
            "or set dataset.bad_images=skip to leave such files out (counted in metrics.json)"
        )

    def after_scan(self, bad: list[Unreadable]) -> set[str]:
        """Apply the rule to the scan's findings; returns the paths to leave out."""
        if not bad:
            return set()
        if self.rule == "error":
            raise self._error(bad, "found before training")
        for item in bad:
            self.skipped[item.path] = item.reason
        shown = ", ".join(item.path for item in bad[:3])
        log.warning(
            "dataset.bad_images=skip: leaving out %d unreadable image(s): %s%s",
            len(bad),
            shown,
            " ..." if len(bad) > 3 else "",
        )
        return {item.path for item in bad}

    def after_load(self, bad: list[Unreadable]) -> None:
        """Apply the rule to files that failed to decode while loading a batch."""
        if not bad:
            return
        if self.rule == "error":
            raise self._error(bad, "(its pixel data cannot be decoded)")
        for item in bad:
            if item.path not in self.skipped:
                self.skipped[item.path] = item.reason
                log.warning("dataset.bad_images=skip: left out %s (%s)", item.path, item.reason)

    def report(self) -> dict[str, Any]:
        """What metrics.json records: the rule, the count and the files left out."""
        files = [{"path": p, "reason": r} for p, r in list(self.skipped.items())[:LISTED]]
        return {"rule": self.rule, "skipped": len(self.skipped), "files": files}
