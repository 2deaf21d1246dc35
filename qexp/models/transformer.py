"""Pre-norm transformer encoder/decoder blocks shared by the ViT and the character GPT.

Every weight matrix is an explicit ``nn.Linear`` (so qexp's wrapper quantizes it), the
LayerNorms stay in float, and both activation-activation products of attention go through
:class:`~qexp.models.layers.MatMul` modules.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from qexp.errors import QexpError
from qexp.models.layers import MatMul, check_positive


class SelfAttention(nn.Module):
    """Multi-head self-attention with separate q, k, v and output projections.

    Args:
        dim: model width (divisible by ``heads``).
        heads: number of attention heads.
        causal: mask out later positions (decoder) or attend everywhere (encoder).
        max_len: longest sequence the causal mask is built for.
        dropout: dropout on the attention weights and the output.
    """

    def __init__(
        self, dim: int, heads: int, causal: bool, max_len: int = 0, dropout: float = 0.0
    ) -> None:
        super().__init__()
        if dim % heads:
            raise QexpError(f"model.dim={dim} must be divisible by model.heads={heads}")
        self.heads = heads
        self.head_dim = dim // heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.scores = MatMul()  # q k^T
        self.mix = MatMul()  # softmax(scores) v
        self.proj = nn.Linear(dim, dim)
        self.attn_drop = nn.Dropout(dropout)
        self.out_drop = nn.Dropout(dropout)
        self.causal = causal
        if causal:
            mask = torch.ones(max_len, max_len, dtype=torch.bool).tril()
            self.register_buffer("mask", mask, persistent=False)

    def _split(self, t: Tensor) -> Tensor:
        b, n, _ = t.shape
        return t.view(b, n, self.heads, self.head_dim).transpose(1, 2)  # (B, heads, N, d)

    def forward(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        q, k, v = self._split(self.q(x)), self._split(self.k(x)), self._split(self.v(x))
        att = self.scores(q, k.transpose(-2, -1)) * (1.0 / math.sqrt(self.head_dim))
        if self.causal:
            att = att.masked_fill(~self.mask[:n, :n], float("-inf"))
        att = self.attn_drop(torch.softmax(att, dim=-1))
        y = self.mix(att, v).transpose(1, 2).reshape(b, n, c)
        return self.out_drop(self.proj(y))


class FeedForward(nn.Module):
    """Linear - GELU - Linear, ``hidden = mlp_ratio * dim``."""

    def __init__(self, dim: int, hidden: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.fc2(self.act(self.fc1(x))))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(ln1(x))``, then ``x + mlp(ln2(x))``."""

    def __init__(
        self,
        dim: int,
        heads: int,
        mlp_ratio: int,
        causal: bool,
        max_len: int = 0,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, heads, causal, max_len, dropout)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = FeedForward(dim, mlp_ratio * dim, dropout)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


def check_sizes(dim: int, depth: int, heads: int, mlp_ratio: int) -> tuple[int, int, int, int]:
    """The transformer sizes as positive ints (a QexpError names a bad one)."""
    return (
        check_positive("dim", dim),
        check_positive("depth", depth),
        check_positive("heads", heads),
        check_positive("mlp_ratio", mlp_ratio),
    )


def init_transformer(model: nn.Module) -> None:
    """GPT-2 style init: Linear and Embedding weights N(0, 0.02), biases zero, LayerNorm unit
    (convolutions keep PyTorch's default)."""
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
