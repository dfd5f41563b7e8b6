"""Per-stage optimisation: frozen modules, per-prefix learning rates, warm-up + cosine schedule, losses."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.nn.modules.loss import _Loss

from medhybrid.config import LossConfig, OptimizerConfig, StageConfig
from medhybrid.errors import ConfigError
from medhybrid.models.heads import AUX_SEG


def _matches(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def check_prefixes(model: nn.Module, stage: StageConfig) -> None:
    """Every ``freeze`` / ``lr_scale`` prefix must name parameters of the model.

    Raises:
        ConfigError: a prefix matching nothing (typically a typo), listing the top-level modules.
    """
    names = [n for n, _ in model.named_parameters()]
    for prefix in (*stage.freeze, *stage.lr_scale):
        if not any(_matches(n, prefix) for n in names):
            top = sorted({n.split(".")[0] for n in names})
            raise ConfigError(
                f"train.stages ({stage.name}): {prefix!r} matches no parameter of the model",
                fix=f"use module names such as {top}",
            )


def check_frozen_are_pretrained(model: nn.Module, stages: tuple[StageConfig, ...], pretrained: set[str]) -> None:
    """A stage may freeze only parameters that were loaded from pretrained weights.

    Freezing a randomly initialised module (a Transformer no checkpoint filled) trains the rest of the
    network around noise that never learns; staged fine-tuning means something only for loaded weights.

    Args:
        pretrained: names of the parameters loaded from ``model.pretrained`` (empty without weights).

    Raises:
        ConfigError: a ``freeze`` prefix covers parameters that were not loaded, naming them and the fix.
    """
    names = [n for n, p in model.named_parameters() if not getattr(p, "_medhybrid_always_frozen", False)]
    for stage in stages:
        check_prefixes(model, stage)  # a typo gets its own message first
        for prefix in stage.freeze:
            random = [n for n in names if _matches(n, prefix) and n not in pretrained]
            if random:
                source = (
                    "no model.pretrained weights are given" if not pretrained else "the pretrained weights lack them"
                )
                raise ConfigError(
                    f"train.stages ({stage.name}): freeze {prefix!r} would freeze {len(random)} randomly "
                    f"initialised parameters ({random[0]}, ...): {source}",
                    fix="train them jointly (drop the freeze) or give model.pretrained weights that contain them",
                )


def param_groups(model: nn.Module, stage: StageConfig) -> list[dict[str, Any]]:
    """Freeze the stage's prefixes (``requires_grad=False``) and group the rest by learning-rate scale.

    The longest matching ``lr_scale`` prefix wins; no weight decay on biases and norm weights (1-D).
    """
    check_prefixes(model, stage)
    groups: dict[tuple[float, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        frozen = any(_matches(name, f) for f in stage.freeze)
        p.requires_grad_(not frozen and not getattr(p, "_medhybrid_always_frozen", False))
        if not p.requires_grad:
            continue
        hits = [pre for pre in stage.lr_scale if _matches(name, pre)]
        scale = stage.lr_scale[max(hits, key=len)] if hits else 1.0
        groups.setdefault((scale, p.ndim <= 1), []).append(p)
    if not groups:
        raise ConfigError(f"train.stages ({stage.name}): every parameter is frozen", fix="freeze fewer modules")
    return [
        {"params": ps, "lr": stage.lr * scale, "lr_scale": scale, "no_decay": no_decay}
        for (scale, no_decay), ps in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1]))
    ]


def mark_untrainable(model: nn.Module) -> None:
    """Remember parameters the model itself keeps frozen (e.g. MONAI's unused ones) across stages."""
    for p in model.parameters():
        if not p.requires_grad:
            p._medhybrid_always_frozen = True  # type: ignore[attr-defined]


def make_optimizer(groups: list[dict[str, Any]], cfg: OptimizerConfig) -> torch.optim.Optimizer:
    for g in groups:
        g["weight_decay"] = 0.0 if g["no_decay"] else cfg.weight_decay
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=groups[0]["lr"], momentum=cfg.momentum, nesterov=True)
    return torch.optim.AdamW(groups, lr=groups[0]["lr"])


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to 0 at ``total`` (or constant)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def make_scheduler(
    optimizer: torch.optim.Optimizer, *, total_steps: int, warmup_steps: int, schedule: str
) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-step ``LambdaLR`` (its state dict is just the step count, so it checkpoints cleanly)."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total_steps, warmup_steps, schedule)
    )


class TaskLoss(nn.Module):
    """Classification and/or segmentation loss on the model's output dict.

    MONAI's ``DiceCELoss`` / ``DiceLoss`` / ``FocalLoss`` do the work; multitask adds ``seg_weight``
    times the segmentation loss to the classification loss. A deeply supervised decoder's coarser logits
    (``seg_logits_aux1``, ...) are scored against the mask downsampled to them (MONAI's
    ``DeepSupervisionLoss``, weights 1, 1/2, 1/4, ... normalised to sum to 1 as nnU-Net does, so that
    ``seg_weight`` means the same with or without them).
    """

    def __init__(self, cfg: LossConfig, task: str, class_weights: list[float] | None = None) -> None:
        super().__init__()
        from monai.losses import DeepSupervisionLoss, DiceCELoss, DiceLoss, FocalLoss

        self.task, self.seg_weight = task, cfg.seg_weight
        weight = torch.tensor(class_weights, dtype=torch.float32) if class_weights else None
        self.cls_loss: nn.Module | None = None
        self.seg_loss: nn.Module | None = None
        if task in ("classification", "multitask"):
            self.cls_loss = (
                FocalLoss(use_softmax=True, to_onehot_y=True, weight=weight, gamma=2.0)
                if cfg.classification == "focal"
                else nn.CrossEntropyLoss(weight=weight)
            )
        if task in ("segmentation", "multitask"):
            # Batch Dice (one Dice over the whole batch, as nnU-Net does): per-sample Dice on studies without
            # any foreground would push every prediction to background. The background class is left out of
            # the Dice term by default (nnU-Net's do_bg=False); the cross-entropy term still covers it.
            bg = cfg.dice_background
            if cfg.segmentation == "dice_ce":
                self.seg_loss = DiceCELoss(to_onehot_y=True, softmax=True, batch=True, include_background=bg)
            elif cfg.segmentation == "dice":
                self.seg_loss = DiceLoss(to_onehot_y=True, softmax=True, batch=True, include_background=bg)
            else:
                self.seg_loss = _MaskCE()
            self.deep = DeepSupervisionLoss(self.seg_loss, weight_mode="exp")
        self.focal = cfg.classification == "focal"

    def forward(self, out: dict[str, torch.Tensor], batch: dict[str, Any]) -> torch.Tensor:
        total = torch.zeros((), device=next(iter(out.values())).device)
        if self.cls_loss is not None:
            logits = out["logits"].float()
            target = batch["label"].long().to(logits.device)
            total = total + (self.cls_loss(logits, target[:, None]) if self.focal else self.cls_loss(logits, target))
        if self.seg_loss is not None:
            weight = self.seg_weight if self.task == "multitask" else 1.0
            levels = [out["seg_logits"].float()]
            while f"{AUX_SEG}{len(levels)}" in out:
                levels.append(out[f"{AUX_SEG}{len(levels)}"].float())
            mask = batch["mask"].to(levels[0].device)
            if len(levels) == 1:
                seg = self.seg_loss(levels[0], mask)
            else:
                seg = self.deep(levels, mask) / sum(self.deep.get_weights(len(levels)))
            total = total + weight * seg
        return total


class _MaskCE(_Loss):
    """Cross-entropy on a ``(B, 1, *spatial)`` label map."""

    def forward(self, logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(logits, mask[:, 0].long())
