"""The models the hybrid must beat, under the same output contract.

- ``resnet``: our ResNet encoder + global pooling + linear classifier.
- ``transformer``: MONAI's ViT (classification from its CLS token).
- ``unetr`` / ``swinunetr``: MONAI's UNETR and SwinUNETR (segmentation).
- ``unet``: MONAI's DynUNet with kernels and strides planned the nnU-Net way, and MONAI's BasicUNet.

MONAI networks need input sizes divisible by their patch/stride product; :class:`MonaiModel` zero-pads
the input up to that multiple and crops the mask back, so every baseline accepts any size.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from monai.networks.nets import UNETR, BasicUNet, DynUNet, SwinUNETR, ViT
from monai.networks.nets import ResNet as MonaiResNet
from torch import nn

from medhybrid.errors import ModelError
from medhybrid.models.base import MedModel, as_tuple, build_config, crop_to, pad_to_multiple
from medhybrid.models.encoders import ResNetConfig, ResNetEncoder
from medhybrid.models.registry import register_model

CLS = ("classification",)
SEG = ("segmentation",)


# --- ResNet-only classifier -----------------------------------------------------------------------


class ResNetClassifier(MedModel):
    """ResNet encoder -> global average pool -> dropout -> linear. ``(B, C, *spatial) -> {"logits": (B, K)}``."""

    def __init__(self, cfg: ResNetConfig, num_classes: int = 2, dropout: float = 0.0) -> None:
        super().__init__(
            spatial_dims=cfg.spatial_dims, in_channels=cfg.in_channels, num_classes=num_classes, seg_classes=0
        )
        self.encoder = ResNetEncoder(cfg)
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(self.encoder.out_channels[-1], num_classes)

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        self.check_input(x)
        return self.encoder(x)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        fmap = self.forward_features(x)[-1]
        return {"logits": self.fc(self.drop(fmap.flatten(2).mean(-1)))}


def _resnet(defaults: dict[str, Any], overrides: dict[str, Any]) -> ResNetClassifier:
    opts = {**defaults, **overrides}
    num_classes = int(opts.pop("num_classes", 2))
    dropout = float(opts.pop("dropout", 0.0))
    return ResNetClassifier(build_config(ResNetConfig, {}, opts), num_classes=num_classes, dropout=dropout)


@register_model(family="resnet", spatial_dims=3, tasks=CLS)
def resnet18_3d(**overrides: Any) -> ResNetClassifier:
    """ResNet-18 classifier (4 stages, 3D)."""
    return _resnet({"depth": 18, "spatial_dims": 3}, overrides)


@register_model(family="resnet", spatial_dims=3, tasks=CLS)
def resnet34_3d(**overrides: Any) -> ResNetClassifier:
    """ResNet-34 classifier (4 stages, 3D)."""
    return _resnet({"depth": 34, "spatial_dims": 3}, overrides)


@register_model(family="resnet", spatial_dims=2, tasks=CLS)
def resnet18_2d(**overrides: Any) -> ResNetClassifier:
    """ResNet-18 classifier (4 stages, 2D)."""
    return _resnet({"depth": 18, "spatial_dims": 2}, overrides)


_RESNET_TINY = {"depth": 10, "widths": (8, 16, 32, 64), "stem_channels": 8}


@register_model(family="resnet", spatial_dims=3, tasks=CLS, tiny=True)
def resnet_tiny_3d(**overrides: Any) -> ResNetClassifier:
    """Test-sized ResNet-10 classifier (3D)."""
    return _resnet({**_RESNET_TINY, "spatial_dims": 3}, overrides)


@register_model(family="resnet", spatial_dims=2, tasks=CLS, tiny=True)
def resnet_tiny_2d(**overrides: Any) -> ResNetClassifier:
    """Test-sized ResNet-10 classifier (2D)."""
    return _resnet({**_RESNET_TINY, "spatial_dims": 2}, overrides)


# --- MONAI networks -------------------------------------------------------------------------------


@dataclass(frozen=True)
class MonaiConfig:
    """Options shared by the MONAI baselines; ``options`` go to the MONAI constructor unchanged.

    Attributes:
        spatial_dims: 2 or 3.
        in_channels: input channels.
        num_classes: classes (ViT only).
        seg_classes: mask channels (UNETR, SwinUNETR, U-Nets).
        img_size: input size for the fixed-size networks (ViT, UNETR); rounded up to the patch size.
        spacing: voxel spacing the nnU-Net planner uses for DynUNet.
        options: further constructor arguments of the MONAI network.
    """

    spatial_dims: int = 3
    in_channels: int = 1
    num_classes: int = 0
    seg_classes: int = 0
    img_size: int | tuple[int, ...] = 64
    spacing: float | tuple[float, ...] = 1.0
    options: tuple[tuple[str, Any], ...] = ()


Kind = Literal["vit", "unetr", "swinunetr", "dynunet", "basicunet", "resnet"]
CLS_KINDS = ("vit", "resnet")


class MonaiModel(MedModel):
    """A MONAI network behind the medhybrid contract (dict output, any input size).

    ``forward_features`` returns the network's encoder outputs: ViT/UNETR hidden states
    ``(B, N, hidden)`` per block, SwinUNETR's five ``(B, C, *spatial)`` maps, the U-Nets' down path.
    """

    def __init__(self, kind: Kind, cfg: MonaiConfig) -> None:
        dims = cfg.spatial_dims
        opts = dict(cfg.options)
        fixed: tuple[int, ...] | None = None
        min_size: int | tuple[int, ...] = 1
        if kind in ("vit", "unetr"):
            patch = as_tuple(opts.pop("patch_size", 16), dims)
            if kind == "unetr" and patch != (16,) * dims:
                raise ModelError(
                    f"UNETR's decoder is built for patch size 16, got {patch}", fix="leave patch_size at 16"
                )
            fixed = as_tuple(cfg.img_size, dims)
            built = tuple(math.ceil(s / p) * p for s, p in zip(fixed, patch, strict=True))  # padded up to the patch
            divisor: tuple[int, ...] = patch
        elif kind == "swinunetr":
            divisor = (2**5,) * dims  # patch 2, then four 2x merges
            min_size = 2**6  # below 64 the bottleneck is 1 voxel and instance norm cannot train
        elif kind == "dynunet":
            kernels, strides = nnunet_plan(as_tuple(cfg.img_size, dims), _floats(cfg.spacing, dims))
            opts = {"kernel_size": kernels, "strides": strides, "upsample_kernel_size": strides[1:], **opts}
            divisor = tuple(math.prod(s[d] for s in strides) for d in range(dims))
            min_size = as_tuple(cfg.img_size, dims)  # nnU-Net pads inputs smaller than the planned patch
        elif kind == "resnet":
            divisor = (1,) * dims
        else:
            divisor = (2**4,) * dims
        super().__init__(
            spatial_dims=dims,
            in_channels=cfg.in_channels,
            num_classes=cfg.num_classes if kind in CLS_KINDS else 0,
            seg_classes=0 if kind in CLS_KINDS else cfg.seg_classes,
            size_divisor=divisor,
            min_size=min_size,
            fixed_size=fixed,
        )
        self.kind = kind
        if kind == "vit":
            self.net: nn.Module = ViT(
                cfg.in_channels,
                built,
                patch,
                classification=True,
                num_classes=cfg.num_classes,
                spatial_dims=dims,
                post_activation=None,
                **opts,
            )
        elif kind == "unetr":
            self.net = UNETR(cfg.in_channels, cfg.seg_classes, built, spatial_dims=dims, **opts)
        elif kind == "swinunetr":
            self.net = SwinUNETR(cfg.in_channels, cfg.seg_classes, spatial_dims=dims, **opts)
        elif kind == "dynunet":
            base, top = opts.pop("base_filters", 32), opts.pop("max_filters", 320)  # nnU-Net: 32 doubling to 320
            opts.setdefault("filters", [min(base * 2**i, top) for i in range(len(opts["strides"]))])
            self.net = DynUNet(dims, cfg.in_channels, cfg.seg_classes, norm_name="instance", res_block=False, **opts)
        elif kind == "basicunet":
            self.net = BasicUNet(dims, cfg.in_channels, cfg.seg_classes, **opts)
        elif kind == "resnet":
            opts.setdefault("layers", [2, 2, 2, 2])  # ResNet-18 unless told otherwise
            opts.setdefault("block_inplanes", [64, 128, 256, 512])
            self.net = MonaiResNet(
                "basic", spatial_dims=dims, n_input_channels=cfg.in_channels, num_classes=cfg.num_classes, **opts
            )
        else:
            raise ModelError(f"unknown MONAI network kind {kind!r}")
        for name, p in self.net.named_parameters():
            # MONAI's TransformerBlock always builds a cross-attention norm; without cross-attention it is
            # never used, so it is frozen rather than left to look like a parameter that fails to train.
            if "norm_cross_attn" in name:
                p.requires_grad_(False)

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        self.check_input(x)
        x, _ = pad_to_multiple(x, self.size_divisor, self.min_size)
        net: Any = self.net
        if self.kind in ("vit", "unetr"):
            vit = net if self.kind == "vit" else net.vit
            return list(vit(x)[1])
        if self.kind == "swinunetr":
            return list(net.swinViT(x, net.normalize))
        if self.kind == "resnet":
            feats = [net.act(net.bn1(net.conv1(x)))]
            h = net.maxpool(feats[0]) if not net.no_max_pool else feats[0]
            for layer in (net.layer1, net.layer2, net.layer3, net.layer4):
                h = layer(h)
                feats.append(h)
            return feats
        if self.kind == "dynunet":
            feats = [net.input_block(x)]
            for down in net.downsamples:
                feats.append(down(feats[-1]))
            return [*feats, net.bottleneck(feats[-1])]
        feats = [net.conv_0(x)]
        for down in (net.down_1, net.down_2, net.down_3, net.down_4):
            feats.append(down(feats[-1]))
        return feats

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        self.check_input(x)
        padded, size = pad_to_multiple(x, self.size_divisor, self.min_size)
        out = self.net(padded)
        if self.kind == "vit":
            return {"logits": out[0]}
        if self.kind == "resnet":
            return {"logits": out}
        return {"seg_logits": crop_to(out, size)}


def nnunet_plan(
    patch_size: Sequence[int], spacing: Sequence[float], min_feature_size: int = 4, max_pools: int = 5
) -> tuple[list[list[int]], list[list[int]]]:
    """Kernels and strides of a U-Net planned the way nnU-Net plans them, for DynUNet.

    Written here because MONAI has no planner. Rules (Isensee et al. 2021): an axis is downsampled while
    it is at least ``2 * min_feature_size`` voxels before the pooling (so it ends at >= ``min_feature_size``)
    and its spacing is under twice the finest spacing among the axes still being downsampled; a lone
    axis is pooled only while it is at least ``3 * min_feature_size``. An axis gets 3-wide kernels once
    its spacing is within twice the finest, 1-wide before that (thick slices are first treated in-plane);
    the bottleneck is always 3-wide. At most ``max_pools`` downsamplings per axis.

    Returns ``(kernels, strides)``: one entry per level, the first stride being 1.
    """
    dims = len(patch_size)
    size, space = [float(s) for s in patch_size], [float(s) for s in spacing]
    pools = [0] * dims
    kernel = [3 if space[d] / min(space) < 2 else 1 for d in range(dims)]
    kernels, strides = [list(kernel)], [[1] * dims]
    while True:
        axes = [d for d in range(dims) if size[d] >= 2 * min_feature_size and pools[d] < max_pools]
        if not axes:
            break
        finest = min(space[d] for d in axes)
        axes = [d for d in axes if space[d] / finest < 2]
        if len(axes) == 1 and size[axes[0]] < 3 * min_feature_size:
            break  # pooling a single axis is only worth it while it is still long
        stride = [2 if d in axes else 1 for d in range(dims)]
        for d in axes:
            pools[d] += 1
            space[d] *= 2
            size[d] = math.ceil(size[d] / 2)
        kernel = [3 if kernel[d] == 3 or space[d] / min(space) < 2 else 1 for d in range(dims)]
        kernels.append(list(kernel))
        strides.append(stride)
    kernels[-1] = [3] * dims  # the bottleneck always gets full 3-wide kernels
    return kernels, strides


def _floats(value: float | Sequence[float], n: int) -> tuple[float, ...]:
    return (float(value),) * n if isinstance(value, (int, float)) else tuple(float(v) for v in value)


_NETWORKS: dict[str, type[nn.Module]] = {
    "vit": ViT,
    "unetr": UNETR,
    "swinunetr": SwinUNETR,
    "dynunet": DynUNet,
    "basicunet": BasicUNet,
    "resnet": MonaiResNet,
}
_OUR_OPTIONS = {"vit": {"patch_size"}, "unetr": {"patch_size"}, "dynunet": {"base_filters", "max_filters"}}
# Set by MonaiModel itself, so not user options.
_RESERVED = {
    "in_channels",
    "out_channels",
    "img_size",
    "spatial_dims",
    "classification",
    "num_classes",
    "post_activation",
    "norm_name",
    "res_block",
    "kernel_size",
    "strides",
    "upsample_kernel_size",
    "n_input_channels",
    "block",
}


def _monai(kind: Kind, defaults: dict[str, Any], overrides: dict[str, Any]) -> MonaiModel:
    fields = {"spatial_dims", "in_channels", "num_classes", "seg_classes", "img_size", "spacing"}
    wrong_head = "seg_classes" if kind in CLS_KINDS else "num_classes"
    if overrides.get(wrong_head):
        task = "classification" if kind in CLS_KINDS else "segmentation"
        raise ModelError(
            f"{kind} does {task} only, so {wrong_head} does not apply",
            fix=f"use {'num_classes' if kind in CLS_KINDS else 'seg_classes'}",
        )
    allowed = set(inspect.signature(_NETWORKS[kind]).parameters) - _RESERVED | _OUR_OPTIONS.get(kind, set())
    unknown = sorted(set(overrides) - fields - allowed)
    if unknown:
        raise ModelError(
            f"unknown model option(s) {', '.join(unknown)} for MONAI {_NETWORKS[kind].__name__}",
            fix=f"valid options: {', '.join(sorted(fields | allowed))}",
        )
    merged = {**defaults, **overrides}
    known = {k: v for k, v in merged.items() if k in fields}
    options = tuple(sorted((k, v) for k, v in merged.items() if k not in fields))
    return MonaiModel(kind, build_config(MonaiConfig, {}, {**known, "options": options}))


@register_model(family="resnet", spatial_dims=2, tasks=CLS)
def monai_resnet18_2d(**overrides: Any) -> MonaiModel:
    """MONAI's own ResNet-18 (monai.networks.nets.ResNet, its defaults), 2D: the reference baseline."""
    return _monai("resnet", {"spatial_dims": 2, "num_classes": 2}, overrides)


@register_model(family="resnet", spatial_dims=3, tasks=CLS)
def monai_resnet18_3d(**overrides: Any) -> MonaiModel:
    """MONAI's own ResNet-18 (monai.networks.nets.ResNet, its defaults), 3D: the reference baseline."""
    return _monai("resnet", {"spatial_dims": 3, "num_classes": 2}, overrides)


_VIT_TINY = {"hidden_size": 32, "mlp_dim": 64, "num_layers": 2, "num_heads": 2, "patch_size": 8}


@register_model(family="transformer", spatial_dims=3, tasks=CLS, fixed_size=True)
def vit_b16_3d(**overrides: Any) -> MonaiModel:
    """MONAI ViT-B/16 (12 blocks, width 768) classifier on 64^3 volumes."""
    return _monai("vit", {"spatial_dims": 3, "num_classes": 2, "img_size": 64}, overrides)


@register_model(family="transformer", spatial_dims=2, tasks=CLS, fixed_size=True)
def vit_b16_2d(**overrides: Any) -> MonaiModel:
    """MONAI ViT-B/16 (12 blocks, width 768) classifier on 128^2 images."""
    return _monai("vit", {"spatial_dims": 2, "num_classes": 2, "img_size": 128}, overrides)


@register_model(family="transformer", spatial_dims=3, tasks=CLS, fixed_size=True, tiny=True)
def vit_tiny_3d(**overrides: Any) -> MonaiModel:
    """Test-sized MONAI ViT (2 blocks, width 32, patch 8), 3D."""
    return _monai("vit", {"spatial_dims": 3, "num_classes": 2, "img_size": 32, **_VIT_TINY}, overrides)


@register_model(family="transformer", spatial_dims=2, tasks=CLS, fixed_size=True, tiny=True)
def vit_tiny_2d(**overrides: Any) -> MonaiModel:
    """Test-sized MONAI ViT (2 blocks, width 32, patch 8), 2D."""
    return _monai("vit", {"spatial_dims": 2, "num_classes": 2, "img_size": 32, **_VIT_TINY}, overrides)


@register_model(family="unetr", spatial_dims=3, tasks=SEG, fixed_size=True)
def unetr_3d(**overrides: Any) -> MonaiModel:
    """MONAI UNETR (ViT-B/16 encoder, feature size 16) on 64^3 volumes."""
    return _monai("unetr", {"spatial_dims": 3, "seg_classes": 2, "img_size": 64}, overrides)


@register_model(family="unetr", spatial_dims=2, tasks=SEG, fixed_size=True)
def unetr_2d(**overrides: Any) -> MonaiModel:
    """MONAI UNETR (ViT-B/16 encoder, feature size 16) on 128^2 images."""
    return _monai("unetr", {"spatial_dims": 2, "seg_classes": 2, "img_size": 128}, overrides)


@register_model(family="unetr", spatial_dims=3, tasks=SEG, fixed_size=True, tiny=True)
def unetr_tiny_3d(**overrides: Any) -> MonaiModel:
    """Test-sized MONAI UNETR (width 32, feature size 4; UNETR's decoder needs patch 16)."""
    return _monai(
        "unetr",
        {
            "spatial_dims": 3,
            "seg_classes": 2,
            "img_size": 32,
            "hidden_size": 32,
            "mlp_dim": 64,
            "num_heads": 2,
            "feature_size": 4,
            "patch_size": 16,
        },
        overrides,
    )


@register_model(family="swinunetr", spatial_dims=3, tasks=SEG)
def swinunetr_3d(**overrides: Any) -> MonaiModel:
    """MONAI SwinUNETR (feature size 24); inputs padded to a multiple of 32."""
    return _monai("swinunetr", {"spatial_dims": 3, "seg_classes": 2}, overrides)


@register_model(family="swinunetr", spatial_dims=2, tasks=SEG)
def swinunetr_2d(**overrides: Any) -> MonaiModel:
    """MONAI SwinUNETR (feature size 24), 2D; inputs padded to a multiple of 32."""
    return _monai("swinunetr", {"spatial_dims": 2, "seg_classes": 2}, overrides)


@register_model(family="swinunetr", spatial_dims=3, tasks=SEG, tiny=True)
def swinunetr_tiny_3d(**overrides: Any) -> MonaiModel:
    """Test-sized MONAI SwinUNETR (feature size 12, one block per stage)."""
    return _monai(
        "swinunetr",
        {"spatial_dims": 3, "seg_classes": 2, "feature_size": 12, "depths": (1, 1, 1, 1), "num_heads": (1, 1, 1, 1)},
        overrides,
    )


@register_model(family="unet", spatial_dims=3, tasks=SEG)
def dynunet_3d(**overrides: Any) -> MonaiModel:
    """MONAI DynUNet planned the nnU-Net way (kernels/strides from img_size and spacing, 32-320 filters)."""
    return _monai("dynunet", {"spatial_dims": 3, "seg_classes": 2, "img_size": 64, "spacing": 1.0}, overrides)


@register_model(family="unet", spatial_dims=2, tasks=SEG)
def dynunet_2d(**overrides: Any) -> MonaiModel:
    """MONAI DynUNet planned the nnU-Net way for 128^2 images."""
    return _monai("dynunet", {"spatial_dims": 2, "seg_classes": 2, "img_size": 128, "spacing": 1.0}, overrides)


@register_model(family="unet", spatial_dims=3, tasks=SEG, tiny=True)
def dynunet_tiny_3d(**overrides: Any) -> MonaiModel:
    """Test-sized nnU-Net-planned DynUNet (4-32 filters)."""
    return _monai(
        "dynunet",
        {"spatial_dims": 3, "seg_classes": 2, "img_size": 32, "base_filters": 4, "max_filters": 32},
        overrides,
    )


@register_model(family="unet", spatial_dims=3, tasks=SEG)
def basicunet_3d(**overrides: Any) -> MonaiModel:
    """MONAI BasicUNet (features 32-256); inputs padded to a multiple of 16."""
    return _monai("basicunet", {"spatial_dims": 3, "seg_classes": 2}, overrides)


@register_model(family="unet", spatial_dims=2, tasks=SEG, tiny=True)
def basicunet_tiny_2d(**overrides: Any) -> MonaiModel:
    """Test-sized MONAI BasicUNet (features 4-32), 2D."""
    return _monai("basicunet", {"spatial_dims": 2, "seg_classes": 2, "features": (4, 4, 8, 16, 32, 4)}, overrides)
