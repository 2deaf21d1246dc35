"""Vectorized batch augmentation on tensors (no per-image PIL work)."""

from __future__ import annotations

import torch
from torch import Tensor


class RandomCropFlip:
    """Random crop with zero padding plus random horizontal flip, for a whole batch at once.

    The standard CIFAR recipe (RandomCrop(32, padding=4) + RandomHorizontalFlip) applied on
    uint8 batches before normalization, so the padding is black as in torchvision. Random
    numbers come from a CPU generator (then move to the batch's device), so results are the
    same on every device.
    """

    def __init__(self, padding: int = 4, flip: bool = True) -> None:
        if padding < 0:
            raise ValueError("padding must be >= 0")
        self.padding = padding
        self.flip = flip

    def sample_params(
        self, batch: int, generator: torch.Generator
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Per-sample (row offset, column offset, flip) drawn on the CPU; offsets in [0, 2*pad]."""
        span = 2 * self.padding + 1
        oy = torch.randint(0, span, (batch,), generator=generator)
        ox = torch.randint(0, span, (batch,), generator=generator)
        if self.flip:
            flip = torch.rand(batch, generator=generator) < 0.5
        else:
            flip = torch.zeros(batch, dtype=torch.bool)
        return oy, ox, flip

    def apply(self, x: Tensor, oy: Tensor, ox: Tensor, flip: Tensor) -> Tensor:
        """Crop each padded image at (oy, ox) and mirror those with flip set.

        out[b, c, i, j] = padded[b, c, oy[b] + i, ox[b] + j'] with j' = W-1-j when flipped.
        """
        b, c, h, w = x.shape
        p = self.padding
        dev = x.device
        oy, ox, flip = oy.to(dev), ox.to(dev), flip.to(dev)
        padded = x.new_zeros((b, c, h + 2 * p, w + 2 * p))
        padded[:, :, p : p + h, p : p + w] = x
        rows = oy[:, None] + torch.arange(h, device=dev)  # (B, H)
        cols = ox[:, None] + torch.arange(w, device=dev)  # (B, W)
        # A horizontal flip of the crop is the crop read with its columns reversed.
        cols = torch.where(flip[:, None], cols.flip(1), cols)
        bi = torch.arange(b, device=dev)[:, None, None, None]
        ci = torch.arange(c, device=dev)[None, :, None, None]
        return padded[bi, ci, rows[:, None, :, None], cols[:, None, None, :]]

    def __call__(self, x: Tensor, generator: torch.Generator) -> Tensor:
        return self.apply(x, *self.sample_params(x.shape[0], generator))

    def __repr__(self) -> str:
        return f"RandomCropFlip(padding={self.padding}, flip={self.flip})"
