"""Saliency for one input: Grad-CAM on the encoder's last stage (MONAI) and attention rollout.

One forward pass gives the outputs, the attention weights and the Grad-CAM activations; one backward
pass gives the Grad-CAM gradients. So explaining a prediction costs one backward pass on top of it.

- **Grad-CAM** (MONAI's ``GradCAM``): the score is the log-odds of abnormality against the normal
  class, ``logsumexp(logit[1:]) - logit[0]`` (any abnormal class; for two classes ``logit[1] - logit[0]``),
  the evidence :mod:`medhybrid.infer.windows` ranks windows by; for a segmentation-only model, the mean
  foreground-vs-background log-odds of the mask. A batch of windows gets each window's own map.
  The map is upsampled to the input and kept
  *raw* (MONAI's per-sample min-max ``postprocessing`` is replaced by the identity).
- **Attention rollout** (Abnar & Zuidema, 2020), written here because neither MONAI nor any
  well-kept library implements it for a custom Transformer: per block, head-averaged attention plus
  the identity (the residual path), rows renormalised, multiplied through the blocks. The row of the
  CLS token gives the relevance of each token to the classification; a segmentation-only model uses
  the mean row over the image tokens. The token grid is upsampled to the input (trilinear/bilinear),
  raw.

The maps leave the :class:`Explainer` unnormalised on purpose: a volume inferred by sliding windows is
explained window by window, and a per-window [0, 1] scale would give every window, evidence or not, its
own bright spot (the blended map shows the patch grid). The caller blends the raw maps over windows
(and ensemble members) and normalises once per study with :func:`normalise`.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn.functional as F
from monai.visualize import GradCAM
from torch import nn

from medhybrid.infer.windows import abnormal_margin

SALIENCY_METHODS = ("gradcam", "attention")


def gradcam_layer(model: nn.Module) -> str | None:
    """Name of the encoder's last stage (``encoder.stages.N``), or None when the model has no ResNet encoder."""
    stages = getattr(getattr(model, "encoder", None), "stages", None)
    if isinstance(stages, nn.ModuleList) and len(stages):
        return f"encoder.stages.{len(stages) - 1}"
    return None


def has_attention(model: nn.Module) -> bool:
    """The model has Transformer blocks to roll out (a hybrid built with ``context_depth=0`` has none)."""
    blocks = getattr(getattr(model, "context", None), "blocks", None)
    return callable(getattr(model, "forward_explained", None)) and bool(blocks is None or len(blocks))


def methods_for(model: nn.Module) -> tuple[str, ...]:
    """The saliency methods a model supports."""
    return tuple(
        m for m, ok in (("gradcam", gradcam_layer(model) is not None), ("attention", has_attention(model))) if ok
    )


class _Scored(nn.Module):
    """Runs the model once, keeps its outputs and attention, and returns the Grad-CAM score logits."""

    def __init__(self, model: nn.Module, want_attention: bool) -> None:
        super().__init__()
        self.model = model
        self.want_attention = want_attention
        self.outputs: dict[str, torch.Tensor] = {}
        self.attention: list[torch.Tensor] = []
        self.grid: tuple[int, ...] = ()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.want_attention:
            self.outputs, self.attention, self.grid = self.model.forward_explained(x)  # type: ignore[operator]
        else:
            self.outputs = self.model(x)
        # one score column per sample: MONAI indexes ``logits[:, class_idx]`` with the per-sample argmax, which
        # for a batch of B sums B copies of the column (every map B times its own); with one column that is
        # exactly B x each sample's map, undone in Explainer.__call__
        if "logits" in self.outputs:
            logits = self.outputs["logits"]
            return abnormal_margin(logits)[:, None]
        seg = self.outputs["seg_logits"]
        return (seg[:, 1:] - seg[:, :1]).flatten(2).mean(-1).mean(1, keepdim=True)


def rollout(maps: list[torch.Tensor], grid: tuple[int, ...], use_cls: bool) -> torch.Tensor:
    """Attention rollout ``(B, 1, *grid)`` from per-block ``(B, heads, N + 1, N + 1)`` weights."""
    n = maps[0].shape[-1]
    eye = torch.eye(n, dtype=maps[0].dtype, device=maps[0].device)
    result = eye.expand(maps[0].shape[0], n, n)
    for weights in maps:
        a = weights.mean(1) + eye
        a = a / a.sum(-1, keepdim=True)
        result = a @ result
    relevance = result[:, 0, 1:] if use_cls else result[:, 1:, 1:].mean(1)
    return relevance.reshape(relevance.shape[0], 1, *grid)


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def normalise(x: torch.Tensor) -> torch.Tensor:
    """Per-sample min-max to [0, 1] (a constant map becomes 0): applied once per study, after blending."""
    flat = x.flatten(1)
    lo, hi = flat.min(1, keepdim=True).values, flat.max(1, keepdim=True).values
    out = (flat - lo) / (hi - lo).clamp(min=1e-12)
    return out.reshape(x.shape)


class Explainer:
    """Outputs and saliency maps of one model; build once per model (MONAI's GradCAM hooks its layer)."""

    def __init__(self, model: nn.Module, methods: tuple[str, ...] = SALIENCY_METHODS) -> None:
        self.methods = tuple(m for m in methods if m in methods_for(model))
        # The wrapper takes the model's mode: MONAI's GradCAM restores the mode of the module it is given
        # after each call, and a fresh nn.Module is in training mode, which would leave the model in
        # training mode (batch statistics in BatchNorm, running stats updated by every later forward).
        self.scored = _Scored(model, "attention" in self.methods).train(model.training)
        layer = gradcam_layer(model) if "gradcam" in self.methods else None
        self.cam = (
            GradCAM(self.scored, target_layers=f"model.{layer}", postprocessing=_identity)
            if layer is not None
            else None
        )

    def __call__(self, x: torch.Tensor) -> dict[str, Any]:
        """``x`` ``(B, C, *spatial)`` -> ``outputs`` (the model's output dict, detached) and one raw
        ``(B, 1, *spatial)`` map (>= 0, not normalised) per supported method."""
        scored = self.scored
        was_training = scored.model.training
        result: dict[str, Any] = {}
        if self.cam is not None:
            with torch.enable_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # MONAI warns about hooks on frozen layers
                # class_idx None: GradCAM scores the one column _Scored returns (the abnormality log-odds)
                cam = self.cam(x.detach()).detach().float() / x.shape[0]  # see _Scored.forward
                result["gradcam"] = torch.nan_to_num(cam, nan=0.0)
        else:
            with torch.no_grad():
                scored(x)
        result["outputs"] = {k: v.detach().float() for k, v in scored.outputs.items()}
        if scored.want_attention:
            with torch.no_grad():
                rolled = rollout(
                    [m.detach().float() for m in scored.attention], scored.grid, "logits" in scored.outputs
                )
                mode = "trilinear" if rolled.ndim == 5 else "bilinear"
                result["attention"] = F.interpolate(rolled, size=tuple(x.shape[2:]), mode=mode, align_corners=False)
        scored.outputs, scored.attention = {}, []
        scored.train(was_training)  # whatever GradCAM did, the model leaves in the mode it came in
        return result
