"""A character-level GPT (nanoGPT-style decoder) that fits qexp's classification trainer.

The trainer computes ``cross_entropy(logits, y)`` and ``argmax(1) == y``; a language model
predicts one character per position, so :meth:`CharGPT.forward` returns the logits of every
position flattened to ``(B*T, vocab)`` and the text data (qexp.data.text) hands out the next
characters flattened to ``(B*T,)``: the loss is the mean over characters and the accuracy is
next-character accuracy.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from qexp.errors import QexpError
from qexp.models.transformer import Block, check_sizes, init_transformer


class CharGPT(nn.Module):
    """Token + position embeddings, causal pre-norm blocks, final LayerNorm, linear LM head.

    Built like every qexp model from the data set's facts: ``num_classes`` is the vocabulary
    size and ``image_size`` the block size (context length) of the text data set;
    ``in_channels`` must be 1. The embeddings and LayerNorms stay in float; the first
    quantizable layer (an edge) is ``blocks.0.attn.q``, the last one ``head``.
    Blocks (for block replacement): ``blocks.0`` .. ``blocks.{depth-1}``.
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int,
        image_size: int,
        dim: int = 64,
        depth: int = 4,
        heads: int = 4,
        mlp_ratio: int = 4,
        dropout: float = 0.0,
        name: str | None = None,
    ) -> None:
        super().__init__()
        if in_channels != 1:
            raise QexpError(
                f"model=char_gpt reads token ids (in_channels 1), but the data set has "
                f"{in_channels} channels: use dataset=text"
            )
        dim, depth, heads, mlp_ratio = check_sizes(dim, depth, heads, mlp_ratio)
        self.block_size = int(image_size)
        self.tok_embed = nn.Embedding(num_classes, dim)
        self.pos_embed = nn.Embedding(self.block_size, dim)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.Sequential(
            *(
                Block(dim, heads, mlp_ratio, causal=True, max_len=self.block_size, dropout=dropout)
                for _ in range(depth)
            )
        )
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        init_transformer(self)

    def forward(self, idx: Tensor) -> Tensor:
        """Token ids ``(B, T)`` -> next-token logits ``(B*T, vocab)``."""
        t = idx.shape[1]
        if t > self.block_size:
            raise ValueError(f"sequence of {t} tokens is longer than the block size "
                             f"{self.block_size}")
        pos = torch.arange(t, device=idx.device)
        x = self.drop(self.tok_embed(idx) + self.pos_embed(pos))
        x = self.norm(self.blocks(x))
        return self.head(x).flatten(0, 1)

    def block_names(self) -> list[str]:
        """Dotted names of the decoder blocks, in forward order."""
        return [f"blocks.{i}" for i in range(len(self.blocks))]
