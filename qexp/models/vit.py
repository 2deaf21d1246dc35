"""A small Vision Transformer (Dosovitskiy et al. 2021) for 28x28 / 32x32 images."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from qexp.errors import QexpError
from qexp.models.layers import check_positive
from qexp.models.transformer import Block, check_sizes, init_transformer

POOLS = ("mean", "cls")


class ViT(nn.Module):
    """Patch embedding, pre-norm encoder blocks, final LayerNorm, pooling, linear head.

    patch_embed: Conv2d(in, dim, patch, stride=patch): the first quantizable layer (an edge)
    blocks.i:    LN - attention (q, k, v, proj Linear; MatMul products) - LN - GELU MLP
    head:        Linear(dim, num_classes): the last quantizable layer (an edge)

    LayerNorms, the position embedding and the class token stay in float. ``pool``: ``mean``
    averages the patch tokens, ``cls`` prepends a learned class token and reads it out.
    Blocks (for block replacement): ``blocks.0`` .. ``blocks.{depth-1}``.
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int,
        image_size: int,
        patch: int = 4,
        dim: int = 64,
        depth: int = 4,
        heads: int = 4,
        mlp_ratio: int = 2,
        pool: str = "mean",
        dropout: float = 0.0,
        name: str | None = None,
    ) -> None:
        super().__init__()
        dim, depth, heads, mlp_ratio = check_sizes(dim, depth, heads, mlp_ratio)
        patch = check_positive("patch", patch)
        if image_size % patch:
            raise QexpError(
                f"model.patch={patch} must divide the image size {image_size}: pick a divisor "
                f"of {image_size}"
            )
        if pool not in POOLS:
            raise QexpError(f"model.pool={pool!r} is not allowed: use {' | '.join(POOLS)}")
        self.pool = pool
        tokens = (image_size // patch) ** 2 + (pool == "cls")
        self.patch_embed = nn.Conv2d(in_channels, dim, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if pool == "cls" else None
        self.pos_embed = nn.Parameter(torch.randn(1, tokens, dim) * 0.02)
        self.blocks = nn.Sequential(
            *(Block(dim, heads, mlp_ratio, causal=False, dropout=dropout) for _ in range(depth))
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        init_transformer(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, patches, dim)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = self.norm(self.blocks(x + self.pos_embed))
        x = x[:, 0] if self.cls_token is not None else x.mean(dim=1)
        return self.head(x)

    def block_names(self) -> list[str]:
        """Dotted names of the encoder blocks, in forward order."""
        return [f"blocks.{i}" for i in range(len(self.blocks))]
