"""The hybrid: ResNet feature pyramid -> Transformer context on the deepest map -> class and mask heads.

::

    x ──ResNet stem──► s0 ──stage1──► s1 ──stage2──► s2 ──stage3──► s3 (B, C, *grid)
                        │              │              │               │ flatten + linear + pos + [CLS]
                        │              │              │               ▼
                        │              │              │      Transformer x depth ──► CLS ──(+ pooled s3)──► logits
                        │              │              │               │ tokens
                        │              │              │               ▼ reshape to grid, conv
                        │              │              └── concat ◄── up   (decoder block 1)
                        │              └───────────────── concat ◄── up   (decoder block 2)
                        └──────────────────────────────── concat ◄── up   (decoder block 3) ──1x1──► up ──► seg_logits
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from medhybrid.errors import ModelError
from medhybrid.models.base import MedModel, as_tuple, build_config, reduced_size
from medhybrid.models.context import ContextConfig, TransformerContext
from medhybrid.models.conv_context import ConvContext
from medhybrid.models.encoders import ResNetConfig, ResNetEncoder, Stride, norm_spec, plan_strides
from medhybrid.models.heads import AUX_SEG, ClassificationHead, SegmentationDecoder, segmentation_evidence
from medhybrid.models.registry import register_model

SEG_AND_CLS = ("classification", "segmentation")
MIN_TOKEN_GRID = {2: 7, 3: 4}  # HybridConfig.min_token_grid's default per spatial dims
FULL_RES_CHANNELS = 16  # the full-resolution decoder block's width when it is on by default (few: it runs at full size)


@dataclass(frozen=True)
class HybridConfig:
    """Every option of a hybrid, flat so that a pipeline YAML can override any one of them.

    Encoder options are those of :class:`~medhybrid.models.encoders.ResNetConfig`; ``context_*``
    those of :class:`~medhybrid.models.context.ContextConfig`.

    Attributes:
        token_stage: the encoder stage (1-4) whose map becomes tokens; later stages are not built.
        img_size: the input size the positional embeddings are stored for (other sizes are resized).
        num_classes: classification outputs (0: no classification head).
        seg_classes: segmentation channels (0: no decoder).
        fuse_pooled: concatenate the pooled token-stage CNN map to the CLS token before the classifier. Off
            by default: it is a path around the Transformer, so with it an ablation of the context head
            (and attention rollout) measures less than it claims; turn it on as an explicit choice.
        fuse_seg_evidence: concatenate the segmentation evidence (the log-odds of the most lesion-like
            voxel of each foreground class, :func:`~medhybrid.models.heads.segmentation_evidence`) to the
            CLS token before the classifier; needs ``seg_classes``. For small lesions the mask sees what
            one CLS token over a coarse grid misses (docs/benchmarks.md, demo).
        decoder_full_res: channels of a last decoder block at the input's resolution (TransUNet's fourth
            block, no skip); 0: the logits are interpolated from the shallowest skip's resolution.
            ``None`` (default): :data:`FULL_RES_CHANNELS` when the stem conv is strided (the shallowest skip
            is then at half resolution), else 0 (the stem's skip already is at full resolution).
        min_token_grid: the token grid's smallest side for an input of ``img_size``: downsampling steps are
            dropped, deepest first, until every axis has at least this many tokens
            (:func:`~medhybrid.models.encoders.plan_strides`), so a small input still gets a grid worth
            attending over (a 32 x 48 x 32 patch at 1/16 would give 2 x 3 x 2 = 12 tokens). ``None``
            (default): 4 in 3D, 7 in 2D (ViT's 7 x 7 at 224 px); 0: the strides as given.
        context: ``"transformer"`` (the hybrid) or ``"conv"``: the ResNet-only ablation, the same encoder
            and decoder with an equal-FLOP stack of convolutional bottleneck blocks in place of the
            Transformer (:class:`~medhybrid.models.conv_context.ConvContext`).
        deep_supervision: coarser decoder blocks with their own head in training (nnU-Net style); their
            logits are returned as ``seg_logits_aux1``, ``seg_logits_aux2``, ... (finest first) in training
            mode only, and the loss weighs them 1/2, 1/4, ... (:class:`medhybrid.train.optim.TaskLoss`).
        seg_prior: the foreground share the segmentation heads start at (RetinaNet's prior bias, see
            :class:`SegmentationDecoder`), for small lesions; ``None`` (default) keeps PyTorch's
            initialisation (about even). Not a default: on large structures a 1 % start costs more than
            it saves (the easy test cohort's out-of-fold Dice 0.84 -> 0.48 in 8 epochs).
        decoder_channels: ``token_stage + 1`` entries (see :class:`SegmentationDecoder`).
    """

    spatial_dims: int = 3
    in_channels: int = 1
    num_classes: int = 2
    seg_classes: int = 2
    img_size: int | tuple[int, ...] = 64
    # encoder
    depth: int = 18
    widths: tuple[int, ...] = (64, 128, 256, 512)
    stem: Literal["standard", "small"] = "standard"
    stem_channels: int = 64
    stem_stride: Stride = 2
    pool_stride: Stride = 2
    stage_strides: tuple[Stride, ...] = (1, 2, 2, 2)
    norm: str | tuple[str, dict[str, Any]] = "batch"
    token_stage: int = 3
    # context
    context_width: int = 384
    context_depth: int = 6
    context_heads: int = 6
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    attn_dropout: float = 0.0
    drop_path: float = 0.0
    # heads
    fuse_pooled: bool = False
    fuse_seg_evidence: bool = False
    head_dropout: float = 0.0
    decoder_channels: tuple[int, ...] = (256, 128, 64, 16)
    decoder_convs: int = 2
    decoder_full_res: int | None = None
    min_token_grid: int | None = None
    context: Literal["transformer", "conv"] = "transformer"
    deep_supervision: int = 0
    seg_prior: float | None = None

    def planned_strides(self) -> tuple[tuple[int, ...], tuple[tuple[int, ...], ...]]:
        """``(pool_stride, stage_strides)`` after :attr:`min_token_grid` planning for ``img_size``."""
        dims = self.spatial_dims
        grid = self.min_token_grid if self.min_token_grid is not None else MIN_TOKEN_GRID[dims]
        stages = tuple(self.stage_strides)[: self.token_stage]
        if len(stages) < self.token_stage:
            raise ModelError(f"stage_strides needs {self.token_stage} entries (token_stage), got {len(stages)}")
        size = as_tuple(self.img_size, dims)
        small = self.stem == "small"  # stride 1 throughout: its stem_stride / pool_stride are unused
        return plan_strides(size, 1 if small else self.stem_stride, 1 if small else self.pool_stride, stages, grid)

    def full_res_channels(self) -> int:
        if self.decoder_full_res is not None:
            return self.decoder_full_res
        strided = self.stem == "standard" and any(s > 1 for s in as_tuple(self.stem_stride, self.spatial_dims))
        return FULL_RES_CHANNELS if strided else 0

    def encoder_config(self) -> ResNetConfig:
        pool, stages = self.planned_strides()
        return ResNetConfig(
            depth=self.depth,
            spatial_dims=self.spatial_dims,
            in_channels=self.in_channels,
            widths=tuple(self.widths),
            num_stages=self.token_stage,
            stem=self.stem,
            stem_channels=self.stem_channels,
            stem_stride=self.stem_stride,
            pool_stride=self.pool_stride if self.stem == "small" else pool,
            stage_strides=stages,
            norm=self.norm,
        )

    def context_config(self, reduction: Sequence[int]) -> ContextConfig:
        size = as_tuple(self.img_size, self.spatial_dims)
        return ContextConfig(
            width=self.context_width,
            depth=self.context_depth,
            heads=self.context_heads,
            mlp_ratio=self.mlp_ratio,
            dropout=self.dropout,
            attn_dropout=self.attn_dropout,
            drop_path=self.drop_path,
            pos_grid=reduced_size(size, reduction),
        )


class HybridModel(MedModel):
    """ResNet encoder + Transformer context + classification head and/or segmentation decoder.

    Shapes: ``(B, in_channels, *spatial)`` -> ``{"logits": (B, num_classes), "seg_logits":
    (B, seg_classes, *spatial)}``; any spatial size (odd ones included) works.

    Raises:
        ModelError: an invalid configuration.
    """

    def __init__(self, cfg: HybridConfig) -> None:
        super().__init__(
            spatial_dims=cfg.spatial_dims,
            in_channels=cfg.in_channels,
            num_classes=cfg.num_classes,
            seg_classes=cfg.seg_classes,
        )
        if not 1 <= cfg.token_stage <= 4:
            raise ModelError(f"token_stage must be 1..4, got {cfg.token_stage}")
        if cfg.fuse_seg_evidence and not (cfg.seg_classes and cfg.num_classes):
            raise ModelError(
                "fuse_seg_evidence needs both a classification head and a decoder (num_classes, seg_classes)"
            )
        self.cfg = cfg
        self.encoder = ResNetEncoder(cfg.encoder_config())
        token_channels = self.encoder.out_channels[-1]
        context_cfg = cfg.context_config(self.encoder.reductions[-1])
        self.context: TransformerContext | ConvContext
        if cfg.context == "conv":
            tokens = math.prod(context_cfg.pos_grid)
            self.context = ConvContext(token_channels, cfg.spatial_dims, context_cfg, tokens, cfg.norm)
        elif cfg.context == "transformer":
            self.context = TransformerContext(token_channels, cfg.spatial_dims, context_cfg)
        else:
            raise ModelError(f"context must be 'transformer' or 'conv', got {cfg.context!r}")
        self.cls_head = (
            ClassificationHead(
                cfg.context_width,
                cfg.num_classes,
                token_channels if cfg.fuse_pooled else 0,
                cfg.head_dropout,
                evidence_channels=cfg.seg_classes - 1 if cfg.fuse_seg_evidence else 0,
            )
            if cfg.num_classes
            else None
        )
        self.decoder = (
            SegmentationDecoder(
                cfg.spatial_dims,
                cfg.context_width,
                skip_channels=self.encoder.out_channels[-2::-1],
                channels=cfg.decoder_channels,
                seg_classes=cfg.seg_classes,
                norm=norm_spec(cfg.norm),
                convs_per_block=cfg.decoder_convs,
                full_res_channels=cfg.full_res_channels(),
                deep_supervision=cfg.deep_supervision,
                foreground_prior=cfg.seg_prior,
            )
            if cfg.seg_classes
            else None
        )

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Encoder maps ``[stem, stage1, ..., stage{token_stage}]``."""
        self.check_input(x)
        return self.encoder(x)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = self.forward_features(x)
        cls, tokens, _ = self.context(feats[-1])
        return self._heads(x, feats, cls, tokens)

    def _heads(
        self, x: torch.Tensor, feats: list[torch.Tensor], cls: torch.Tensor, tokens: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        fmap = feats[-1]
        out: dict[str, torch.Tensor] = {}
        if self.decoder is not None:
            out["seg_logits"], aux = self.decoder(tokens, fmap.shape[2:], feats[-2::-1], x.shape[2:])
            out.update({f"{AUX_SEG}{i}": a for i, a in enumerate(aux, start=1)})
        if self.cls_head is not None:
            evidence = segmentation_evidence(out["seg_logits"]) if self.cfg.fuse_seg_evidence else None
            out["logits"] = self.cls_head(cls, fmap, evidence)
        return out

    def forward_explained(self, x: torch.Tensor) -> tuple[dict[str, torch.Tensor], list[torch.Tensor], tuple[int, ...]]:
        """``forward`` plus what saliency needs, in one pass: the outputs, the attention weights of every
        block ``(B, heads, N + 1, N + 1)`` (CLS token first) and the token grid (``N = prod(grid)``)."""
        feats = self.forward_features(x)
        cls, tokens, maps = self.context(feats[-1], return_attention=True)
        assert maps is not None  # return_attention=True always returns the list
        return self._heads(x, feats, cls, tokens), maps, tuple(int(s) for s in feats[-1].shape[2:])

    def attention_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Attention weights of every block, ``(B, heads, N + 1, N + 1)`` with the CLS token first,
        for a token grid of ``forward_features(x)[-1].shape[2:]``."""
        return self.forward_explained(x)[1]


def _hybrid(defaults: dict[str, Any], overrides: dict[str, Any]) -> HybridModel:
    return HybridModel(build_config(HybridConfig, defaults, overrides))


# --- variants -------------------------------------------------------------------------------------
# Defaults are chosen for this project's data: 64^3 CT/MR crops and 128^2 radiographs (or 28-px MedMNIST
# with the small stem). Each factory takes keyword overrides of any HybridConfig field.

# 3D: a 32-channel stem and a slim decoder keep the half-resolution work small (see docs/models.md, latency).
_R18_3D = dict(spatial_dims=3, depth=18, img_size=64, stem_channels=32, decoder_channels=(128, 64, 32, 16))
_R18_2D = dict(spatial_dims=2, depth=18, img_size=128, decoder_channels=(256, 128, 64, 32))
_TINY = dict(
    depth=10,
    widths=(8, 16, 32, 64),
    stem_channels=8,
    context_width=32,
    context_depth=2,
    context_heads=2,
    decoder_channels=(32, 16, 8, 8),
)


@register_model(family="hybrid", spatial_dims=3, tasks=SEG_AND_CLS)
def hybrid_r18_3d(**overrides: Any) -> HybridModel:
    """ResNet-18 (3 stages, 1/16) + 6-block Transformer (width 384) on 64^3 volumes; class + mask."""
    return _hybrid(_R18_3D, overrides)


@register_model(family="hybrid", spatial_dims=3, tasks=SEG_AND_CLS)
def hybrid_r18_3d_aniso(**overrides: Any) -> HybridModel:
    """ResNet-18 with in-plane-only early strides, for thick-slice volumes (slice axis last)."""
    return _hybrid(
        {
            **_R18_3D,
            "stem_stride": (2, 2, 1),
            "pool_stride": (2, 2, 1),
            "stage_strides": (1, (2, 2, 1), 2, 2),
            "img_size": (64, 64, 32),
        },
        overrides,
    )


@register_model(family="hybrid", spatial_dims=3, tasks=SEG_AND_CLS)
def hybrid_r18_3d_small(**overrides: Any) -> HybridModel:
    """ResNet-18 with the small stem (no early downsampling) for 28^3 MedMNIST3D volumes."""
    return _hybrid(
        {
            **_R18_3D,
            "stem": "small",
            "img_size": 28,
            "widths": (32, 64, 128, 256),
            "stem_channels": 32,
            "context_width": 256,
            "context_heads": 4,
            "context_depth": 4,
            "decoder_channels": (128, 64, 32, 32),
        },
        overrides,
    )


@register_model(family="hybrid", spatial_dims=3, tasks=SEG_AND_CLS)
def hybrid_r34_3d(**overrides: Any) -> HybridModel:
    """ResNet-34 (3 stages) + 8-block Transformer (width 512) on 64^3 volumes; class + mask."""
    return _hybrid({**_R18_3D, "depth": 34, "context_width": 512, "context_depth": 8, "context_heads": 8}, overrides)


@register_model(family="hybrid", spatial_dims=2, tasks=SEG_AND_CLS)
def hybrid_r18_2d(**overrides: Any) -> HybridModel:
    """ResNet-18 (3 stages) + 6-block Transformer (width 384) on 128^2 images; class + mask."""
    return _hybrid(_R18_2D, overrides)


@register_model(family="hybrid", spatial_dims=2, tasks=SEG_AND_CLS)
def hybrid_r18_2d_small(**overrides: Any) -> HybridModel:
    """ResNet-18 with the small stem for 28^2 MedMNIST images."""
    return _hybrid(
        {**_R18_2D, "stem": "small", "img_size": 28, "context_depth": 4, "decoder_channels": (256, 128, 64, 64)},
        overrides,
    )


@register_model(family="hybrid", spatial_dims=2, tasks=SEG_AND_CLS)
def hybrid_r50_2d(**overrides: Any) -> HybridModel:
    """TransUNet-like: ResNet-50 (3 stages) + 12-block Transformer (width 768) on 224^2 images."""
    return _hybrid(
        {
            **_R18_2D,
            "depth": 50,
            "img_size": 224,
            "context_width": 768,
            "context_depth": 12,
            "context_heads": 12,
            "decoder_channels": (512, 256, 128, 64),
        },
        overrides,
    )


@register_model(family="hybrid", spatial_dims=3, tasks=SEG_AND_CLS, tiny=True)
def hybrid_tiny_3d(**overrides: Any) -> HybridModel:
    """Test-sized 3D hybrid (ResNet-10, widths 8-64, 2 blocks of width 32)."""
    return _hybrid({**_R18_3D, **_TINY, "img_size": 32}, overrides)


@register_model(family="hybrid", spatial_dims=2, tasks=SEG_AND_CLS, tiny=True)
def hybrid_tiny_2d(**overrides: Any) -> HybridModel:
    """Test-sized 2D hybrid (ResNet-10, widths 8-64, 2 blocks of width 32)."""
    return _hybrid({**_R18_2D, **_TINY, "img_size": 32}, overrides)
