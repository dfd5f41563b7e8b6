"""Heads: study-level classification from the CLS token, and a TransUNet-style segmentation decoder."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution
from torch import nn

from medhybrid.errors import ModelError

AUX_SEG = "seg_logits_aux"  # output keys seg_logits_aux1, 2, ...: deep supervision's coarser logits

_UPSAMPLE = {2: "bilinear", 3: "trilinear"}


class ClassificationHead(nn.Module):
    """Logits ``(B, num_classes)`` from the CLS token ``(B, width)``, optionally concatenated with the
    global-average-pooled deepest CNN map ``(B, pooled_channels)`` and with the segmentation evidence
    ``(B, evidence_channels)`` (see :func:`segmentation_evidence`)."""

    def __init__(
        self, width: int, num_classes: int, pooled_channels: int = 0, dropout: float = 0.0, evidence_channels: int = 0
    ) -> None:
        super().__init__()
        self.pooled_channels = pooled_channels
        self.evidence_channels = evidence_channels
        self.norm_pooled = nn.LayerNorm(pooled_channels) if pooled_channels else None
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(width + pooled_channels + evidence_channels, num_classes)
        nn.init.zeros_(self.fc.bias)
        nn.init.trunc_normal_(self.fc.weight, std=0.02)

    def forward(
        self, cls: torch.Tensor, fmap: torch.Tensor | None = None, evidence: torch.Tensor | None = None
    ) -> torch.Tensor:
        if self.norm_pooled is not None:
            if fmap is None:
                raise ModelError("this classification head fuses pooled CNN features: pass the feature map")
            cls = torch.cat([cls, self.norm_pooled(fmap.flatten(2).mean(-1))], dim=1)
        if self.evidence_channels:
            if evidence is None:
                raise ModelError("this classification head fuses the segmentation evidence: pass it")
            cls = torch.cat([cls, evidence], dim=1)
        return self.fc(self.drop(cls))


def segmentation_evidence(seg_logits: torch.Tensor) -> torch.Tensor:
    """The strongest voxel of each foreground class: ``max over voxels of (logit_c - logit_background)``,
    ``(B, seg_classes - 1)``: the log-odds of the most lesion-like voxel, the score a reader of the mask
    would use to call a study abnormal. Detached: the mask loss alone shapes the decoder (with the gradient
    of the study label on that one voxel, the demo's lesion Dice fell from 0.54 to 0.37), and the classifier
    learns how far to trust the evidence."""
    logits = seg_logits.detach()
    margin = logits[:, 1:] - logits[:, :1]
    return margin.flatten(2).amax(-1)


def _conv(dims: int, cin: int, cout: int, norm: Any, kernel: int = 3) -> Convolution:
    return Convolution(dims, cin, cout, kernel_size=kernel, act="relu", norm=norm, bias=False)


class DecoderBlock(nn.Module):
    """Upsample to the skip's size, concatenate the skip, then ``convs`` conv-norm-ReLU layers."""

    def __init__(self, dims: int, cin: int, skip: int, cout: int, norm: Any, convs: int = 2) -> None:
        super().__init__()
        self.dims = dims
        layers = [_conv(dims, cin + skip, cout, norm)] + [_conv(dims, cout, cout, norm) for _ in range(convs - 1)]
        self.convs = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None, size: Sequence[int]) -> torch.Tensor:
        # Resize to the exact size of the finer map (not a fixed factor): odd input sizes stay aligned.
        x = F.interpolate(x, size=tuple(size), mode=_UPSAMPLE[self.dims], align_corners=False)
        if skip is not None:
            x = torch.cat([x, skip], dim=1)
        return self.convs(x)


def _prior_bias(bias: torch.Tensor, foreground: float) -> None:
    """Set a softmax head's biases so it starts at ``foreground`` (split over the classes after the first).

    Background's bias stays 0 and each of the K foreground classes gets ``log(foreground / (K (1 - foreground)))``,
    so ``softmax`` gives background ``1 - foreground`` and each foreground class ``foreground / K``.
    """
    if not 0.0 < foreground < 1.0:
        raise ModelError(f"foreground_prior must lie in (0, 1), got {foreground}")
    k = bias.numel() - 1
    with torch.no_grad():
        bias.zero_()
        bias[1:] = math.log(foreground / (k * (1.0 - foreground)))


class SegmentationDecoder(nn.Module):
    """TransUNet decoder: tokens reshaped to a map, then upsampled through the encoder's skips.

    Args:
        dims: 2 or 3.
        width: token width.
        skip_channels: channels of the skips, deep to shallow (e.g. stage2, stage1, stem).
        channels: decoder channels; ``channels[0]`` is the map the tokens are projected to and
            ``channels[i + 1]`` the output of the block that merges ``skip_channels[i]``.
        seg_classes: output channels.
        norm: MONAI norm name.
        convs_per_block: conv layers per decoder block (TransUNet uses 2).
        full_res_channels: channels of TransUNet's last block, which upsamples to the input's size
            without a skip (the stem is strided, so nothing at full resolution exists to merge) and
            convolves there before the head; 0 leaves it out and interpolates the logits instead.
        deep_supervision: how many coarser blocks (the ones before the last) get their own 1x1 head, whose
            logits :meth:`forward` also returns in training mode (nnU-Net's deep supervision: the loss sees
            every level, so the deep blocks learn where a structure is before the fine ones can draw it).
        foreground_prior: the share of voxels the heads predict as foreground before any training (split
            evenly over the foreground classes; RetinaNet's prior initialisation of the last bias). With
            zero biases every voxel starts at 1/seg_classes foreground, the loss's first and cheapest escape
            is to call everything background, and on small lesions a run can sit there for many epochs
            (seed-dependent); starting near the true share removes that plateau. ``None``: PyTorch's default
            initialisation.

    Shapes: ``tokens (B, N, width)`` on ``grid``, skips ``(B, C_i, *size_i)`` -> ``(B, seg_classes, *out_size)``.
    Without the full-resolution block the last block runs at the shallowest skip's resolution and the
    logits are interpolated to ``out_size``: cheaper (full-resolution convolutions are the costliest part
    of a 3D decoder), but a lesion a few voxels wide is then drawn from a map at half its resolution.

    Raises:
        ModelError: ``channels`` does not have one entry more than ``skip_channels``.
    """

    def __init__(
        self,
        dims: int,
        width: int,
        skip_channels: Sequence[int],
        channels: Sequence[int],
        seg_classes: int,
        norm: Any = "batch",
        convs_per_block: int = 2,
        full_res_channels: int = 0,
        deep_supervision: int = 0,
        foreground_prior: float | None = None,
    ) -> None:
        super().__init__()
        if len(channels) != len(skip_channels) + 1:
            raise ModelError(
                f"decoder_channels needs {len(skip_channels) + 1} entries (token_stage + 1) for "
                f"{len(skip_channels)} skips, got {tuple(channels)}"
            )
        self.dims = dims
        self.bridge = _conv(dims, width, channels[0], norm)
        self.blocks = nn.ModuleList(
            DecoderBlock(dims, channels[i], skip_channels[i], channels[i + 1], norm, convs_per_block)
            for i in range(len(skip_channels))
        )
        self.full_res = (
            DecoderBlock(dims, channels[-1], 0, full_res_channels, norm, convs_per_block) if full_res_channels else None
        )
        self.head = Convolution(dims, full_res_channels or channels[-1], seg_classes, kernel_size=1, conv_only=True)
        # block outputs before the last one, finest first: the levels deep supervision may head
        coarser = ([channels[-1]] if full_res_channels else []) + list(channels[-2:0:-1])
        if not 0 <= deep_supervision <= len(coarser):
            raise ModelError(f"deep_supervision must be 0..{len(coarser)} for this decoder, got {deep_supervision}")
        self.aux_heads = nn.ModuleList(
            Convolution(dims, c, seg_classes, kernel_size=1, conv_only=True) for c in coarser[:deep_supervision]
        )
        if foreground_prior is not None:
            for head in (self.head, *self.aux_heads):
                _prior_bias(head.conv.bias, foreground_prior)

    def forward(
        self, tokens: torch.Tensor, grid: Sequence[int], skips: Sequence[torch.Tensor], out_size: Sequence[int]
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The logits ``(B, seg_classes, *out_size)`` and, in training mode with deep supervision, each aux
        head's logits at its block's resolution, finest first (else an empty list)."""
        x = tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], *grid)
        x = self.bridge(x)
        levels = []
        for block, skip in zip(self.blocks, skips, strict=True):
            x = block(x, skip, skip.shape[2:])
            levels.append(x)
        if self.full_res is not None:
            x = self.full_res(x, None, out_size)
            levels.append(x)
        x = self.head(x)
        if tuple(x.shape[2:]) != tuple(out_size):
            x = F.interpolate(x, size=tuple(out_size), mode=_UPSAMPLE[self.dims], align_corners=False)
        if not self.training:
            return x, []
        return x, [head(level) for head, level in zip(self.aux_heads, levels[-2::-1], strict=False)]
