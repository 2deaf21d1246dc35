"""Character-level language modelling on a plain-text file (default: Debian's fortunes).

Splits are fixed, by position, **per file**: each file of the corpus is cut into its first 90 %
(train), next 5 % (val) and last 5 % (test), each cut moved to the nearest quotation boundary
(a fortunes ``%`` line; in a plain file, the nearest line start), and the train parts, the val
parts and the test parts are concatenated in file order. So every split samples every topic
file (one cut of the whole concatenation would leave the test split inside the last file), and
no window straddles two splits. The vocabulary is the sorted set of the corpus's characters
(sorted, so the ids depend only on which characters occur, not on where they first appear).

Batches fit qexp's classification trainer: ``x`` holds windows of ``block_size`` ids
``(B, block_size)`` and ``y`` the next character of every position, flattened to
``(B * block_size,)`` (the model, qexp.models.char_gpt, flattens its logits the same way).
Training windows start at random positions drawn from a generator seeded by (seed, epoch);
an epoch is ``len(train) // block_size`` windows (each character seen about once).
Evaluation uses fixed non-overlapping windows. The DataInfo says ``num_classes`` = vocabulary
size, ``in_channels`` = 1, ``image_size`` = block size and ``input_kind`` = "tokens".
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from qexp.data.base import (
    Batch,
    DataInfo,
    DataModule,
    check_batch_size,
    check_split,
    check_subset,
    epoch_seed,
    normalize_device,
)
from qexp.errors import QexpError

#: where Debian's ``fortunes`` package installs its collections
FORTUNES_DIR = Path("/usr/share/games/fortunes")
#: the collections of quotations in prose (no ASCII art, program code or verse), ~550 KB
FORTUNE_FILES = ("literature", "wisdom", "humorists", "people", "science", "work")
#: train / val / test shares of each file, in this order by position
SPLIT_FRACTIONS = (0.90, 0.05, 0.05)
SPLITS = ("train", "val", "test")
#: values of ``dataset.split``: per_file (each file cut 90/5/5, parts joined per split) or
#: concatenated (the files joined, then cut once: the test split is the last file's tail)
SPLIT_MODES = ("per_file", "concatenated")

#: "X<backspace>Y" prints Y over X (bold, underline); "____<4 backspaces>SOME" nests such pairs
_OVERSTRIKE = re.compile(r"[^\x08]\x08")


def clean_fortunes(text: str) -> str:
    """A fortune file as prose: the ``%`` separator lines and overstriking removed."""
    while True:  # innermost pairs first, until the nested runs are gone
        text, count = _OVERSTRIKE.subn("", text)
        if not count:
            break
    text = text.replace("\x08", "")  # a backspace at the very start has nothing to strike
    return "".join(line for line in text.splitlines(keepends=True) if line.rstrip() != "%")


def read_corpus(path: str | None, split: str = "per_file") -> tuple[dict[str, str], str]:
    """({train, val, test: text}, where it came from): the user's file, or the default fortunes
    collections, each file split by :func:`split_by_position` and the parts joined per split
    (``split="concatenated"``: the files joined first, then cut at the exact positions, as
    qexp did before per-file splits; kept so such runs can be repeated)."""
    if split not in SPLIT_MODES:
        raise QexpError(f"dataset.split={split!r} is not allowed: use one of {SPLIT_MODES}")
    if split == "concatenated":
        return _concatenated_splits(path)
    if path is not None:
        file = Path(path).expanduser()
        if not file.is_file():
            raise QexpError(f"dataset.path={path}: no such file; give a plain-text file")
        text = file.read_text(encoding="utf-8", errors="replace")
        return dict(zip(SPLITS, split_by_position(text, SPLIT_FRACTIONS), strict=True)), str(file)
    missing = [f for f in FORTUNE_FILES if not (FORTUNES_DIR / f).is_file()]
    if missing:
        raise QexpError(
            f"dataset=text: the default corpus {FORTUNES_DIR}/{missing[0]} is missing: install "
            "Debian's fortunes package (apt-get install fortunes) or set dataset.path=FILE"
        )
    parts: dict[str, list[str]] = {k: [] for k in SPLITS}
    for f in FORTUNE_FILES:
        raw = (FORTUNES_DIR / f).read_text(encoding="utf-8", errors="replace")
        # cut between quotations (after a "%" line), then clean each part
        for split, part in zip(SPLITS, split_by_position(raw, SPLIT_FRACTIONS, "%"), strict=True):
            parts[split].append(clean_fortunes(part))
    source = f"{FORTUNES_DIR}/{{{','.join(FORTUNE_FILES)}}}"
    return {k: "".join(v) for k, v in parts.items()}, source


def _concatenated_splits(path: str | None) -> tuple[dict[str, str], str]:
    """The whole corpus cleaned and joined, then cut 90/5/5 at the exact positions."""
    if path is not None:
        texts, source = read_corpus(path)
        text = "".join(texts[k] for k in SPLITS)
    else:
        read_corpus(None)  # the missing-corpus check
        text = "".join(
            clean_fortunes((FORTUNES_DIR / f).read_text(encoding="utf-8", errors="replace"))
            for f in FORTUNE_FILES
        )
        source = f"{FORTUNES_DIR}/{{{','.join(FORTUNE_FILES)}}}"
    n = len(text)
    train_end = int(n * SPLIT_FRACTIONS[0])
    val_end = train_end + int(n * SPLIT_FRACTIONS[1])
    return dict(zip(SPLITS, (text[:train_end], text[train_end:val_end], text[val_end:]),
                    strict=True)), source  # fmt: skip


def split_by_position(
    text: str, fractions: Sequence[float], separator: str | None = None
) -> tuple[str, str, str]:
    """(train, val, test) parts of one file: its first ``fractions[0]``, the next
    ``fractions[1]`` and the rest, by position, each cut moved to the nearest boundary: the
    start of a line after a ``separator`` line where there is one, else of any line, else the
    exact position (a file without newlines)."""
    n = len(text)
    cuts = _boundaries(text, separator)
    train_end = _nearest(cuts, int(n * fractions[0]), n)
    val_end = max(train_end, _nearest(cuts, int(n * fractions[0]) + int(n * fractions[1]), n))
    return text[:train_end], text[train_end:val_end], text[val_end:]


def _boundaries(text: str, separator: str | None) -> list[int]:
    """Positions a split may start at, ascending: line starts (after a separator line, when
    the text has one)."""
    starts, after_separator, pos = [], [], 0
    for line in text.split("\n")[:-1]:  # the last piece ends the text, not a line
        pos += len(line) + 1
        starts.append(pos)
        if separator is not None and line.rstrip() == separator:
            after_separator.append(pos)
    return after_separator or starts


def _nearest(cuts: list[int], pos: int, n: int) -> int:
    """The cut nearest ``pos`` (the earlier one on a tie), or ``pos`` when there is none
    strictly inside the text."""
    inside = [c for c in cuts if 0 < c < n]
    if not inside:
        return pos
    i = bisect.bisect_left(inside, pos)
    near = [inside[j] for j in (i - 1, i) if 0 <= j < len(inside)]
    return min(near, key=lambda c: (abs(c - pos), c))


def encode_with(vocab: list[str], text: str) -> Tensor:
    """int64 ids of every character of ``text`` in ``vocab``."""
    index = {ch: i for i, ch in enumerate(vocab)}
    return torch.tensor([index[ch] for ch in text], dtype=torch.long)


class TextData(DataModule):
    """Character-level language-modelling data (see the module docstring).

    Args:
        path: a plain-text file (UTF-8); null = the fortunes collections in ``FORTUNE_FILES``.
        split: ``per_file`` (see the module docstring) or ``concatenated`` (the files joined,
            then cut at the exact 90 / 5 % positions: qexp's splits before per-file ones).
        block_size: characters per window (the model's context length).
        subset: at most this many training windows per epoch (quick smoke runs).
        name: data-set name reported in DataInfo.
    """

    def __init__(
        self,
        path: str | None = None,
        split: str = "per_file",
        block_size: int = 64,
        subset: int | None = None,
        name: str | None = None,
    ) -> None:
        check_subset(subset)
        if isinstance(block_size, bool) or int(block_size) != block_size or block_size < 1:
            raise QexpError(f"dataset.block_size must be a positive integer, got {block_size!r}")
        self.block_size = int(block_size)
        texts, self.source = read_corpus(path, split)
        self.vocab = sorted(set("".join(texts.values())))
        self._cpu = {k: encode_with(self.vocab, v) for k, v in texts.items()}
        short = [k for k, v in self._cpu.items() if v.numel() < self.block_size + 1]
        if short:
            total = sum(v.numel() for v in self._cpu.values())
            raise QexpError(
                f"dataset=text: the {short[0]} split of {self.source} ({total} characters) "
                f"is shorter than one window of block_size+1={self.block_size + 1} characters; "
                "use a longer file or a smaller dataset.block_size"
            )
        self._cache: dict[torch.device, dict[str, Tensor]] = {}
        windows = (self._cpu["train"].numel() - 1) // self.block_size
        self.num_train = min(windows, subset) if subset is not None else windows
        self.num_val = self._eval_windows("val")
        self.num_test = self._eval_windows("test")
        self.info = DataInfo(
            name=name or "text",
            num_classes=len(self.vocab),
            in_channels=1,
            image_size=self.block_size,
            input_kind="tokens",
        )

    def _eval_windows(self, split: str) -> int:
        return (self._cpu[split].numel() - 1) // self.block_size

    def _on(self, device: torch.device | str) -> dict[str, Tensor]:
        device = normalize_device(device)
        if device not in self._cache:
            self._cache[device] = {k: v.to(device) for k, v in self._cpu.items()}
        return self._cache[device]

    def _windows(self, ids: Tensor, starts: Tensor) -> Batch:
        """Inputs ``(B, block)`` starting at ``starts`` and their next characters ``(B*block,)``."""
        offsets = torch.arange(self.block_size, device=ids.device)
        pos = starts[:, None] + offsets[None, :]
        return ids[pos], ids[pos + 1].reshape(-1)

    def train_batches(
        self, batch_size: int, epoch: int, seed: int, device: torch.device
    ) -> Iterator[Batch]:
        check_batch_size(batch_size)
        return self._train_iter(batch_size, epoch, seed, device)

    def _train_iter(
        self, batch_size: int, epoch: int, seed: int, device: torch.device
    ) -> Iterator[Batch]:
        ids = self._on(device)["train"]
        g = torch.Generator().manual_seed(epoch_seed(seed, epoch))
        # any start that leaves room for a window and its next character
        starts = torch.randint(ids.numel() - self.block_size, (self.num_train,), generator=g)
        starts = starts.to(ids.device)
        for lo in range(0, self.num_train, batch_size):
            yield self._windows(ids, starts[lo : lo + batch_size])

    def eval_batches(self, split: str, batch_size: int, device: torch.device) -> Iterator[Batch]:
        check_split(split)
        check_batch_size(batch_size)
        return self._eval_iter(split, batch_size, device)

    def _eval_iter(self, split: str, batch_size: int, device: torch.device) -> Iterator[Batch]:
        ids = self._on(device)[split]
        starts = torch.arange(self._eval_windows(split), device=ids.device) * self.block_size
        for lo in range(0, starts.numel(), batch_size):
            yield self._windows(ids, starts[lo : lo + batch_size])

    def data_report(self) -> dict[str, Any]:
        """The corpus and its size, for metrics.json."""
        return {
            "text_source": self.source,
            "vocab_size": len(self.vocab),
            "characters": {k: int(v.numel()) for k, v in self._cpu.items()},
        }

    def __repr__(self) -> str:
        return (
            f"TextData({self.source}: vocab={len(self.vocab)}, block={self.block_size}, "
            f"train windows={self.num_train}, val={self.num_val}, test={self.num_test})"
        )
