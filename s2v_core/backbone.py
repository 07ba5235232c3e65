"""The shared sequence backbone: pre-norm transformer blocks over the epochs of one window.

Written out rather than taken from ``nn.TransformerEncoderLayer`` so that

- each projection is its own ``nn.Linear`` with a stable name (``q_proj``,
  ``k_proj``, ``v_proj``, ``out_proj``, ``fc1``, ``fc2``): adapters such as
  ``peft`` LoRA target them by name;
- attention runs through ``F.scaled_dot_product_attention`` (flash / memory-
  efficient kernels on GPUs, a fused kernel on CPUs);
- positions may be rotary (RoFormer, Su et al. 2021): relative by
  construction, so an encoder trained on 10-epoch windows encodes a whole
  night (about 1,000 epochs) without a position table to outgrow.

A block computes ``x + drop(attn(norm1(x)))`` then ``x + drop(mlp(norm2(x)))``
(the ``norm_first`` layout of format-1 encoders, whose weights map onto it
one to one); the backbone ends with ``final_norm``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: Rotary base frequency (RoFormer's and most LLMs' choice): the slowest pair
#: of dimensions turns once in about 2π·10⁴ positions, far beyond a night.
ROTARY_BASE = 10_000.0


def rotary_tables(length: int, head_dim: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """``cos`` and ``sin`` ``(length, head_dim)`` float32 for positions ``0 … length-1``.

    Dimension ``i`` and ``i + head_dim/2`` form a pair rotated by angle
    ``position · ROTARY_BASE^(-2i/head_dim)`` (the "rotate half" layout).
    Built on ``device`` each call (no host-to-device copy, no buffer that a
    bf16 cast would coarsen).
    """
    exponents = torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim
    inverse_frequency = ROTARY_BASE**-exponents
    angles = torch.arange(length, device=device, dtype=torch.float32)[:, None] * inverse_frequency[None, :]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate ``x`` ``(..., L, head_dim)`` by the tables of :func:`rotary_tables`."""
    first, second = x.chunk(2, dim=-1)
    rotated = torch.cat([-second, first], dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


class Attention(nn.Module):
    """Multi-head self-attention with separate q/k/v projections and SDPA."""

    def __init__(self, width: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: Tensor, rotary: tuple[Tensor, Tensor] | None = None) -> Tensor:
        rows, length, width = x.shape
        shape = (rows, length, self.heads, width // self.heads)
        q, k, v = (proj(x).view(shape).transpose(1, 2) for proj in (self.q_proj, self.k_proj, self.v_proj))
        if rotary is not None:
            q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(y.transpose(1, 2).reshape(rows, length, width))


class FeedForward(nn.Module):
    """``fc2(dropout(gelu(fc1(x))))``."""

    def __init__(self, width: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.dropout(F.gelu(self.fc1(x))))


class Block(nn.Module):
    """One pre-norm transformer block."""

    def __init__(self, width: int, heads: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads, dropout)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = FeedForward(width, hidden, dropout)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, rotary: tuple[Tensor, Tensor] | None = None) -> Tensor:
        x = x + self.dropout(self.attn(self.norm1(x), rotary))
        return x + self.dropout(self.mlp(self.norm2(x)))


class Backbone(nn.Module):
    """``depth`` blocks and a final LayerNorm; input and output ``(rows, E, width)``.

    Parameters
    ----------
    width, depth, heads : int
        Model width ``d``, number of blocks, attention heads (``d % heads == 0``).
    hidden : int
        Feed-forward width (``mlp_ratio * d``).
    dropout : float
        Dropout on attention weights, residual branches and the feed-forward hidden layer.
    rotary : bool
        Rotary position embeddings in every attention (``ModelConfig.position == "rotary"``).
    """

    def __init__(self, width: int, depth: int, heads: int, hidden: int, dropout: float, *, rotary: bool) -> None:
        super().__init__()
        self.rotary = rotary
        self.head_dim = width // heads
        self.layers = nn.ModuleList(Block(width, heads, hidden, dropout) for _ in range(depth))
        self.final_norm = nn.LayerNorm(width)

    def forward(self, x: Tensor) -> Tensor:
        tables = rotary_tables(x.shape[1], self.head_dim, x.device) if self.rotary else None
        for layer in self.layers:
            x = layer(x, tables)
        return self.final_norm(x)
