"""ResNet encoder (2D/3D) that returns every stage's feature map.

The residual blocks are MONAI's (``ResNetBlock``, ``ResNetBottleneck``). The stage assembly is ours
because MONAI's ``ResNet`` fixes the stride of every stage to 2 on all axes and returns only the last
map; thick-slice volumes need anisotropic strides and the decoder needs each stage's output.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from monai.networks.layers.factories import Conv, Pool
from monai.networks.layers.utils import get_act_layer, get_norm_layer
from monai.networks.nets.resnet import ResNetBlock, ResNetBottleneck
from torch import nn

from medhybrid.errors import ModelError
from medhybrid.models.base import as_tuple

Stride = int | Sequence[int]

# Blocks per stage for each depth, and whether the blocks are bottlenecks (He et al. 2016, table 1).
RESNET_DEPTHS: dict[int, tuple[tuple[int, ...], bool]] = {
    10: ((1, 1, 1, 1), False),
    18: ((2, 2, 2, 2), False),
    34: ((3, 4, 6, 3), False),
    50: ((3, 4, 6, 3), True),
}


@dataclass(frozen=True)
class ResNetConfig:
    """How to build a :class:`ResNetEncoder`.

    Attributes:
        depth: 10, 18, 34 (basic blocks) or 50 (bottleneck blocks).
        spatial_dims: 2 or 3.
        in_channels: input channels.
        widths: planes of each stage (a bottleneck stage outputs 4x as many channels).
        num_stages: how many of the four stages to build (a hybrid that takes tokens from stage 3 needs
            no stage 4).
        stem: ``"standard"`` (k=7 conv, stride ``stem_stride``, then max-pool) or ``"small"`` (k=3 conv,
            stride 1, no pool: for 28-px inputs such as MedMNIST).
        stem_channels: channels of the stem conv.
        stem_stride: stride of the stem conv; an int or one value per axis.
        pool_stride: stride of the stem max-pool (standard stem only); per axis allowed.
        stage_strides: stride of each stage's first block; per axis allowed, e.g. ``(2, 2, 1)`` to keep
            the through-plane resolution of a thick-slice volume.
        norm: MONAI norm name (``"batch"``, ``"instance"``, ``"group"`` = 8 groups) or a MONAI (name, args) tuple.
        act: MONAI activation name.
    """

    depth: int = 18
    spatial_dims: int = 3
    in_channels: int = 1
    widths: tuple[int, ...] = (64, 128, 256, 512)
    num_stages: int = 4
    stem: Literal["standard", "small"] = "standard"
    stem_channels: int = 64
    stem_stride: Stride = 2
    pool_stride: Stride = 2
    stage_strides: tuple[Stride, ...] = (1, 2, 2, 2)
    norm: str | tuple[str, dict[str, object]] = "batch"
    act: str = "relu"

    def validate(self) -> None:
        """Raises: ModelError: a value out of range, with what is allowed."""
        if self.depth not in RESNET_DEPTHS:
            raise ModelError(f"ResNet depth must be one of {sorted(RESNET_DEPTHS)}, got {self.depth}")
        if self.spatial_dims not in (2, 3):
            raise ModelError(f"spatial_dims must be 2 or 3, got {self.spatial_dims}")
        if not 1 <= self.num_stages <= 4:
            raise ModelError(f"num_stages must be 1..4, got {self.num_stages}")
        if len(self.widths) < self.num_stages or len(self.stage_strides) < self.num_stages:
            raise ModelError(f"widths and stage_strides need {self.num_stages} entries (one per stage)")
        if self.stem not in ("standard", "small"):
            raise ModelError(f"stem must be 'standard' or 'small', got {self.stem!r}")
        if self.stem == "small" and (self.stem_stride != 2 or self.pool_stride != 2):
            raise ModelError("stem_stride and pool_stride apply to the standard stem only; the small stem has stride 1")


def norm_spec(norm: str | tuple[str, dict[str, object]]) -> str | tuple[str, dict[str, object]]:
    """MONAI's norm factory needs ``num_groups`` for group norm; ``"group"`` alone means 8 groups, and
    ``"instance"`` alone means instance norm with learned scale and shift (nnU-Net's; MONAI's default has
    none, so a block could not rescale its output)."""
    if norm == "group":
        return ("group", {"num_groups": 8})
    if norm == "instance":
        return ("instance", {"affine": True})
    return norm


def plan_strides(
    size: Sequence[int],
    stem_stride: Stride,
    pool_stride: Stride,
    stage_strides: Sequence[Stride],
    min_grid: int,
) -> tuple[tuple[int, ...], tuple[tuple[int, ...], ...]]:
    """Drop downsampling steps until the deepest map of an input of ``size`` is at least ``min_grid``
    cells along every axis (as nnU-Net's planner stops pooling an axis once it is small).

    Steps go deepest first (last stage, ..., first stage, then the stem's max-pool), per axis; the stem
    conv's stride is kept (it sets the cost of everything after it). ``min_grid`` 0 plans nothing.

    Returns:
        ``(pool_stride, stage_strides)`` with one value per axis each.
    """
    dims = len(size)
    pool = list(as_tuple(pool_stride, dims))
    stages = [list(as_tuple(s, dims)) for s in stage_strides]
    stem = as_tuple(stem_stride, dims)
    for axis in range(dims):
        # the strides along this axis, deepest first, as (list, index) so they can be set to 1
        steps = [(st, axis) for st in reversed(stages)] + [(pool, axis)]

        def grid(axis: int = axis) -> int:
            red = stem[axis] * pool[axis] * math.prod(st[axis] for st in stages)
            return math.ceil(size[axis] / red)

        for holder, i in steps:
            if grid() >= min_grid:
                break
            holder[i] = 1
    return tuple(pool), tuple(tuple(st) for st in stages)


class ResNetEncoder(nn.Module):
    """A ResNet that returns ``[stem, stage1, ..., stageN]`` feature maps.

    Shapes: input ``(B, in_channels, *spatial)``; output ``i`` is ``(B, out_channels[i], *spatial / reductions[i])``
    (rounded up: odd sizes are fine).

    Raises:
        ModelError: invalid configuration.
    """

    def __init__(self, cfg: ResNetConfig) -> None:
        super().__init__()
        cfg.validate()
        cfg = dataclasses.replace(cfg, norm=norm_spec(cfg.norm))
        self.cfg = cfg
        dims = cfg.spatial_dims
        conv = Conv[Conv.CONV, dims]
        blocks, bottleneck = RESNET_DEPTHS[cfg.depth]
        block_type: type[ResNetBlock] | type[ResNetBottleneck] = ResNetBottleneck if bottleneck else ResNetBlock

        if cfg.stem == "standard":
            stem_stride = as_tuple(cfg.stem_stride, dims)
            # k=7 along strided axes (the classic stem), k=3 along axes kept at full resolution.
            kernel = tuple(7 if s > 1 else 3 for s in stem_stride)
            pool_stride = as_tuple(cfg.pool_stride, dims)
        else:
            stem_stride, kernel, pool_stride = (1,) * dims, (3,) * dims, (1,) * dims
        self.stem = nn.Sequential(
            conv(
                cfg.in_channels,
                cfg.stem_channels,
                kernel,
                stride=stem_stride,
                padding=tuple(k // 2 for k in kernel),
                bias=False,
            ),
            get_norm_layer(name=cfg.norm, spatial_dims=dims, channels=cfg.stem_channels),
            get_act_layer(name=cfg.act),
        )
        self.pool: nn.Module = (
            Pool[Pool.MAX, dims](
                kernel_size=tuple(3 if s > 1 else 1 for s in pool_stride),
                stride=pool_stride,
                padding=tuple(1 if s > 1 else 0 for s in pool_stride),
            )
            if any(s > 1 for s in pool_stride)
            else nn.Identity()
        )

        reduction = [s * p for s, p in zip(stem_stride, pool_stride, strict=True)]
        self.reductions: list[tuple[int, ...]] = [tuple(stem_stride)]
        self.out_channels: list[int] = [cfg.stem_channels]
        in_planes = cfg.stem_channels
        stages = []
        for i in range(cfg.num_stages):
            stride = as_tuple(cfg.stage_strides[i], dims)
            planes = cfg.widths[i]
            layers: list[nn.Module] = []
            for b in range(blocks[i]):
                s = stride if b == 0 else (1,) * dims
                downsample = None
                if b == 0 and (any(v > 1 for v in s) or in_planes != planes * block_type.expansion):
                    downsample = nn.Sequential(
                        conv(in_planes, planes * block_type.expansion, 1, stride=s, bias=False),
                        get_norm_layer(name=cfg.norm, spatial_dims=dims, channels=planes * block_type.expansion),
                    )
                layers.append(
                    block_type(
                        in_planes,
                        planes,
                        spatial_dims=dims,
                        stride=s,  # type: ignore[arg-type]  # MONAI annotates int; the conv takes a tuple
                        downsample=downsample,
                        act=cfg.act,
                        norm=cfg.norm,
                    )
                )
                in_planes = planes * block_type.expansion
            stages.append(nn.Sequential(*layers))
            reduction = [r * s for r, s in zip(reduction, stride, strict=True)]
            self.reductions.append(tuple(reduction))
            self.out_channels.append(in_planes)
        self.stages = nn.ModuleList(stages)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Conv3d)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm3d, nn.GroupNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = [self.stem(x)]
        h = self.pool(feats[0])
        for stage in self.stages:
            h = stage(h)
            feats.append(h)
        return feats
