"""Character-level language modelling on a plain-text file (default: Debian's fortunes).

The whole text is one sequence of character ids; the vocabulary is the sorted set of the
file's characters (sorted, so the ids depend only on which characters occur, not on where
they first appear: the same file always gives the same ids). The sequence is split by position
into train / val / test (90 / 5 / 5 %, contiguous, so no window straddles two splits).

Batches fit qexp's classification trainer: ``x`` holds windows of ``block_size`` ids
``(B, block_size)`` and ``y`` the next character of every position, flattened to
``(B * block_size,)`` (the model, qexp.models.char_gpt, flattens its logits the same way).
Training windows start at random positions drawn from a generator seeded by (seed, epoch);
an epoch is ``len(train) // block_size`` windows (each character seen about once).
Evaluation uses fixed non-overlapping windows. The DataInfo says ``num_classes`` = vocabulary
size, ``in_channels`` = 1, ``image_size`` = block size and ``input_kind`` = "tokens".
"""

from __future__ import annotations

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
#: train / val / test shares of the sequence, in this order by position
SPLIT_FRACTIONS = (0.90, 0.05, 0.05)

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


def read_corpus(path: str | None) -> tuple[str, str]:
    """(text, where it came from): the user's file, or the default fortunes collections."""
    if path is not None:
        file = Path(path).expanduser()
        if not file.is_file():
            raise QexpError(f"dataset.path={path}: no such file; give a plain-text file")
        return file.read_text(encoding="utf-8", errors="replace"), str(file)
    missing = [f for f in FORTUNE_FILES if not (FORTUNES_DIR / f).is_file()]
    if missing:
        raise QexpError(
            f"dataset=text: the default corpus {FORTUNES_DIR}/{missing[0]} is missing: install "
            "Debian's fortunes package (apt-get install fortunes) or set dataset.path=FILE"
        )
    parts = [
        clean_fortunes((FORTUNES_DIR / f).read_text(encoding="utf-8", errors="replace"))
        for f in FORTUNE_FILES
    ]
    return "".join(parts), f"{FORTUNES_DIR}/{{{','.join(FORTUNE_FILES)}}}"


def encode(text: str) -> tuple[list[str], Tensor]:
    """(sorted vocabulary, int64 ids of every character)."""
    vocab = sorted(set(text))
    index = {ch: i for i, ch in enumerate(vocab)}
    return vocab, torch.tensor([index[ch] for ch in text], dtype=torch.long)


def position_splits(ids: Tensor, fractions: Sequence[float]) -> dict[str, Tensor]:
    """Contiguous train / val / test slices of ``ids`` by the given shares."""
    n = ids.numel()
    train_end = int(n * fractions[0])
    val_end = train_end + int(n * fractions[1])
    return {"train": ids[:train_end], "val": ids[train_end:val_end], "test": ids[val_end:]}


class TextData(DataModule):
    """Character-level language-modelling data (see the module docstring).

    Args:
        path: a plain-text file (UTF-8); null = the fortunes collections in ``FORTUNE_FILES``.
        block_size: characters per window (the model's context length).
        subset: at most this many training windows per epoch (quick smoke runs).
        name: data-set name reported in DataInfo.
    """

    def __init__(
        self,
        path: str | None = None,
        block_size: int = 64,
        subset: int | None = None,
        name: str | None = None,
    ) -> None:
        check_subset(subset)
        if isinstance(block_size, bool) or int(block_size) != block_size or block_size < 1:
            raise QexpError(f"dataset.block_size must be a positive integer, got {block_size!r}")
        self.block_size = int(block_size)
        text, self.source = read_corpus(path)
        self.vocab, ids = encode(text)
        self._cpu = position_splits(ids, SPLIT_FRACTIONS)
        short = [k for k, v in self._cpu.items() if v.numel() < self.block_size + 1]
        if short:
            raise QexpError(
                f"dataset=text: the {short[0]} split of {self.source} ({ids.numel()} characters) "
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
