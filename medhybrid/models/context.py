"""Transformer context head: a CNN feature map becomes tokens that attend to each other globally.

Written here rather than taken from MONAI's ``TransformerBlock`` because that block has no
stochastic depth, and it can return attention weights only on its slow non-SDPA path; ours uses
``scaled_dot_product_attention`` normally and computes explicit weights only when they are asked for.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from monai.networks.layers import DropPath
from torch import nn

from medhybrid.errors import ModelError

_INTERP_MODE = {1: "linear", 2: "bicubic", 3: "trilinear"}


@dataclass(frozen=True)
class ContextConfig:
    """How to build a :class:`TransformerContext`.

    Attributes:
        width: token dimension (model width).
        depth: number of Transformer blocks; 0 builds the ablation without a Transformer (tokens are the
            projected feature map plus position embeddings, and the CLS token is a learned constant).
        heads: attention heads (``width`` must divide by it).
        mlp_ratio: hidden size of each block's MLP, as a multiple of ``width``.
        dropout: dropout after the projection, in the MLP and on the attention output.
        attn_dropout: dropout on the attention weights (training only).
        drop_path: stochastic-depth rate of the last block (rates rise linearly from 0).
        pos_grid: token grid the learned positional embeddings are stored at; they are resized
            (bicubic/trilinear) to whatever grid the input gives, so any input size works.
    """

    width: int = 384
    depth: int = 6
    heads: int = 6
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    attn_dropout: float = 0.0
    drop_path: float = 0.0
    pos_grid: tuple[int, ...] = (4, 4, 4)

    def validate(self) -> None:
        """Raises: ModelError: a value out of range."""
        if self.heads < 1 or self.width % self.heads:
            raise ModelError(f"context width {self.width} is not divisible by heads {self.heads}")
        if self.depth < 0 or self.mlp_ratio <= 0:
            raise ModelError(f"context depth must be >= 0 and mlp_ratio > 0 (got {self.depth}, {self.mlp_ratio})")
        for name in ("dropout", "attn_dropout", "drop_path"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ModelError(f"context {name} must be in [0, 1), got {getattr(self, name)}")


class Attention(nn.Module):
    """Multi-head self-attention on ``(B, N, D)`` tokens."""

    def __init__(self, width: int, heads: int, attn_dropout: float, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.attn_dropout = attn_dropout
        self.proj_drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, return_attention: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        p = self.attn_dropout if self.training else 0.0
        weights = None
        if return_attention:
            # Explicit weights for saliency; same maths as SDPA (scale 1/sqrt(d_head)).
            weights = (q @ k.transpose(-2, -1) * (q.shape[-1] ** -0.5)).softmax(dim=-1)
            out = F.dropout(weights, p) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=p)
        out = out.transpose(1, 2).reshape(b, n, d)
        return self.proj_drop(self.proj(out)), weights


class Block(nn.Module):
    """Pre-norm Transformer block with stochastic depth."""

    def __init__(self, cfg: ContextConfig, drop_path: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.width)
        self.attn = Attention(cfg.width, cfg.heads, cfg.attn_dropout, cfg.dropout)
        self.norm2 = nn.LayerNorm(cfg.width)
        hidden = int(cfg.width * cfg.mlp_ratio)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.width, hidden),
            nn.GELU(),
            nn.Dropout(cfg.dropout),
            nn.Linear(hidden, cfg.width),
            nn.Dropout(cfg.dropout),
        )
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, return_attention: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        a, weights = self.attn(self.norm1(x), return_attention)
        x = x + self.drop_path(a)
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x, weights


class TransformerContext(nn.Module):
    """Tokens from a ``(B, C, *grid)`` feature map, a CLS token, and Transformer blocks over them.

    ``forward`` returns ``(cls (B, width), tokens (B, N, width), attention)`` where ``N = prod(grid)``
    and ``attention`` is a list of ``(B, heads, N + 1, N + 1)`` per block (CLS first) or None.

    Raises:
        ModelError: invalid configuration.
    """

    def __init__(self, in_channels: int, spatial_dims: int, cfg: ContextConfig) -> None:
        super().__init__()
        cfg.validate()
        if len(cfg.pos_grid) != spatial_dims:
            raise ModelError(f"pos_grid {cfg.pos_grid} needs {spatial_dims} entries")
        self.cfg = cfg
        self.spatial_dims = spatial_dims
        self.proj = nn.Linear(in_channels, cfg.width)  # a 1x1 conv on the feature map, done on tokens
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.width))
        self.cls_pos = nn.Parameter(torch.zeros(1, 1, cfg.width))
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.width, *cfg.pos_grid))
        self.pos_drop = nn.Dropout(cfg.dropout)
        rates = [cfg.drop_path * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]
        if rates:
            rates[-1] = cfg.drop_path  # with one block, that block gets the full rate
        self.blocks = nn.ModuleList(Block(cfg, r) for r in rates)
        self.norm = nn.LayerNorm(cfg.width)
        for p in (self.cls_token, self.cls_pos, self.pos_embed):
            nn.init.trunc_normal_(p, std=0.02)
        self.apply(_init_linear)

    def position_embedding(self, grid: Sequence[int]) -> torch.Tensor:
        """Positional embeddings ``(1, prod(grid), width)`` resized from the stored grid."""
        pos: torch.Tensor = self.pos_embed
        if tuple(grid) != tuple(pos.shape[2:]):
            pos = F.interpolate(pos, size=tuple(grid), mode=_INTERP_MODE[self.spatial_dims], align_corners=False)
        return pos.flatten(2).transpose(1, 2)

    def forward(
        self, fmap: torch.Tensor, return_attention: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor] | None]:
        grid = fmap.shape[2:]
        tokens = self.proj(fmap.flatten(2).transpose(1, 2)) + self.position_embedding(grid)
        cls = (self.cls_token + self.cls_pos).expand(tokens.shape[0], -1, -1)
        x = self.pos_drop(torch.cat([cls, tokens], dim=1))
        maps: list[torch.Tensor] = []
        for block in self.blocks:
            x, weights = block(x, return_attention)
            if weights is not None:
                maps.append(weights)
        x = self.norm(x)
        return x[:, 0], x[:, 1:], (maps if return_attention else None)


def _init_linear(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
