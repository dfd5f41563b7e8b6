"""The ResNet-only ablation's context: convolutional bottleneck blocks where the hybrid has a Transformer.

A fair test of "the Transformer helps" swaps the Transformer for convolutions that cost the same (not for
nothing: a hybrid with ``context_depth: 0`` also loses depth and FLOPs). :class:`ConvContext` keeps the
hybrid's interface (``(cls, tokens, attention)`` from a feature map) so the encoder, decoder and heads are
the very same modules; only what mixes the token grid differs: local 3x3(x3) convolutions instead of
global attention. Written here because MONAI has no block with this interface; the blocks themselves are
MONAI's ``Convolution`` layers.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from monai.networks.blocks import Convolution
from torch import nn

from medhybrid.models.context import ContextConfig
from medhybrid.models.encoders import norm_spec


def transformer_block_flops(width: int, mlp_ratio: float, tokens: int) -> float:
    """FLOPs per token of one pre-norm Transformer block (multiply-add = 2): qkv and output projections
    (4 D^2), the MLP (2 r D^2) and attention over ``tokens + 1`` keys (2 N D for scores and for values)."""
    return 2.0 * (4 * width**2 + 2 * mlp_ratio * width**2 + 2 * (tokens + 1) * width)


def equal_flop_width(width: int, mlp_ratio: float, tokens: int, spatial_dims: int) -> int:
    """The mid width ``m`` of a 1x1 -> 3^d -> 1x1 bottleneck at ``width`` channels whose FLOPs per voxel,
    ``2 (2 width m + 3^d m^2)``, match one Transformer block's per token (positive root of the quadratic),
    rounded to a multiple of 8 (group norm's 8 groups must divide it)."""
    k = 3**spatial_dims
    target = transformer_block_flops(width, mlp_ratio, tokens) / 2.0
    m = (-2 * width + math.sqrt(4 * width**2 + 4 * k * target)) / (2 * k)
    return max(8, 8 * round(m / 8))


class Bottleneck(nn.Module):
    """``x + conv1x1(conv3(conv1x1(x)))`` with norm and ReLU inside, at ``width`` channels."""

    def __init__(self, dims: int, width: int, mid: int, norm: Any) -> None:
        super().__init__()
        self.body = nn.Sequential(
            Convolution(dims, width, mid, kernel_size=1, act="relu", norm=norm, bias=False),
            Convolution(dims, mid, mid, kernel_size=3, act="relu", norm=norm, bias=False),
            Convolution(dims, mid, width, kernel_size=1, norm=norm, bias=False, act=None),
        )
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x + self.body(x))


class ConvContext(nn.Module):
    """Projected feature map -> ``cfg.depth`` equal-FLOP bottleneck blocks -> tokens; the "CLS" is the
    mean of the tokens (a CNN's global average pool).

    ``forward`` returns ``(cls (B, width), tokens (B, N, width), attention)`` like
    :class:`~medhybrid.models.context.TransformerContext`; ``attention`` is always None (and
    ``blocks`` is empty, so saliency offers Grad-CAM only).

    Args:
        tokens: the token count the FLOPs are matched at (the grid of the training input).
    """

    def __init__(self, in_channels: int, spatial_dims: int, cfg: ContextConfig, tokens: int, norm: Any) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.blocks = nn.ModuleList()  # no attention blocks: nothing to roll out
        norm = norm_spec(norm)
        self.mid = equal_flop_width(cfg.width, cfg.mlp_ratio, tokens, spatial_dims)
        self.proj = Convolution(spatial_dims, in_channels, cfg.width, kernel_size=1, conv_only=True)
        self.convs = nn.Sequential(*(Bottleneck(spatial_dims, cfg.width, self.mid, norm) for _ in range(cfg.depth)))
        self.norm = nn.LayerNorm(cfg.width)

    def forward(
        self, fmap: torch.Tensor, return_attention: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor] | None]:
        x = self.convs(self.proj(fmap))
        tokens = self.norm(x.flatten(2).transpose(1, 2))
        return tokens.mean(1), tokens, ([] if return_attention else None)
