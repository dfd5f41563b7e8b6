"""Validation during training: AUROC / accuracy (scikit-learn), Dice (MONAI), loss.

Each rank runs its share of the validation studies, per-study results are gathered, and every rank
computes the same metrics from the full list, so early stopping and model selection agree across
ranks and match a single-process run.

Dice follows evaluate's empty-mask rule (:func:`medhybrid.evaluate.segmentation.dice_with_empty_rule`): a
class painted into a study that has none scores 0, a class absent from both sides is left out. A
segmentation-only model with lesion labels also gets its study score
(:func:`medhybrid.evaluate.study_score.lesion_score`) per study, and the operating point stored with the
weights is chosen on it (truth: the reference mask holds a lesion voxel). These figures are measured on
the split that selects the epoch: they drive training and are optimistic as estimates of accuracy.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from monai.data import CacheDataset
from monai.data import Dataset as MonaiDataset
from monai.transforms import Compose
from torch import nn

from medhybrid.config import EvalConfig, MinSensitivity, PipelineConfig
from medhybrid.data.transforms import IMAGE, LABEL, MASK, VOXEL_ML, model_window
from medhybrid.evaluate.segmentation import dice_with_empty_rule
from medhybrid.evaluate.study_score import lesion_score, reference_abnormal
from medhybrid.infer.windows import windowed
from medhybrid.runtime import autocast
from medhybrid.train import distributed as dist_utils
from medhybrid.train.distributed import DistInfo
from medhybrid.train.optim import TaskLoss


class Validator:
    """Holds this rank's (cached) validation samples and scores a model on them."""

    def __init__(
        self,
        cfg: PipelineConfig,
        items: Sequence[dict[str, Any]],
        transform: Compose,
        loss: TaskLoss,
        info: DistInfo,
        device: torch.device,
        num_classes: int,
        seg_classes: int,
        lesions: Sequence[int] = (),
    ) -> None:
        self.cfg, self.loss, self.info, self.device = cfg, loss, info, device
        self.num_classes, self.seg_classes = num_classes, seg_classes
        # segmentation-only models with lesion labels: a study score per study (no classifier)
        self.lesions = list(lesions) if cfg.data.task == "segmentation" else []
        self.indices = list(range(info.rank, len(items), info.world_size))
        mine = [items[i] for i in self.indices]
        self.data: Any = (
            CacheDataset(mine, transform, num_workers=max(1, torch.get_num_threads()), progress=False)
            if cfg.data.cache == "memory"
            else MonaiDataset(mine, transform)
        )
        self.total = len(items)
        self.window = model_window(cfg.data)

    @torch.no_grad()
    def run(self, model: nn.Module) -> dict[str, Any]:
        model.eval()
        records = [self._score(model, i, self.data[k]) for k, i in enumerate(self.indices)]
        everything = [r for part in dist_utils.gather_objects(self.info, records) for r in part]
        everything.sort(key=lambda r: r["index"])
        return compute_metrics(everything, self.cfg.eval.metrics, self.num_classes, self.seg_classes, self.cfg.eval)

    def _score(self, model: nn.Module, index: int, sample: dict[str, Any]) -> dict[str, Any]:
        image = sample[IMAGE][None].to(self.device)
        batch: dict[str, Any] = {}
        with autocast(self.device) if self.cfg.train.amp else contextlib.nullcontext():
            # the same windows and aggregation as inference (medhybrid/infer/windows.py)
            out = {
                k: v.float()
                for k, v in windowed(model, image, self.window, overlap=self.cfg.eval.window_overlap).items()
            }
        record: dict[str, Any] = {"index": index}
        if LABEL in sample:
            batch[LABEL] = torch.as_tensor([sample[LABEL]])
            record["label"] = int(sample[LABEL])
            record["probs"] = torch.softmax(out["logits"], 1)[0].cpu().numpy().tolist()
        if MASK in sample:
            mask = sample[MASK][None].to(self.device)
            batch[MASK] = mask
            pred = out["seg_logits"].argmax(1, keepdim=True)
            record["dice"] = dice_with_empty_rule(pred, mask, self.seg_classes)
            if self.lesions:
                probs = torch.softmax(out["seg_logits"][0], 0)
                voxel_ml = float(sample[VOXEL_ML])  # the model grid's voxel, as inference measures it
                record["score"] = lesion_score(probs, self.lesions, voxel_ml, self.cfg.eval.min_lesion_ml)
                record["label"] = int(reference_abnormal(mask, self.lesions))
        record["loss"] = float(self.loss(out, batch).item())
        return record


def compute_metrics(
    records: Sequence[dict[str, Any]],
    metrics: Sequence[str],
    num_classes: int,
    seg_classes: int,
    rule: EvalConfig | None = None,
) -> dict[str, Any]:
    """Metrics over per-study records (``probs``/``label``, ``dice``, ``loss``).

    With class probabilities (or the lesion ``score`` of a segmentation-only model) and both normal
    (label 0) and abnormal cases present, ``operating_point`` holds the threshold chosen by
    ``rule.operating_point`` (see :func:`operating_point`).
    """
    from sklearn.metrics import roc_auc_score

    out: dict[str, Any] = {"n": len(records)}
    if "loss" in metrics:
        out["loss"] = float(np.mean([r["loss"] for r in records]))
    if records and "probs" in records[0]:
        probs = np.asarray([r["probs"] for r in records], dtype=np.float64)
        labels = np.asarray([r["label"] for r in records])
        if "accuracy" in metrics:
            out["accuracy"] = float((probs.argmax(1) == labels).mean())
        if "auroc" in metrics:
            if len(np.unique(labels)) < 2:
                out["auroc"] = math.nan  # undefined with one class present
            elif num_classes == 2:
                out["auroc"] = float(roc_auc_score(labels, probs[:, 1]))
            else:
                out["auroc"] = float(
                    roc_auc_score(labels, probs, multi_class="ovr", average="macro", labels=list(range(num_classes)))
                )
        if np.any(labels == 0) and np.any(labels != 0):
            out["operating_point"] = operating_point(labels != 0, abnormality(probs), rule)
    elif records and "score" in records[0]:
        labels = np.asarray([r["label"] for r in records])
        if np.any(labels == 0) and np.any(labels != 0):
            scores = np.asarray([r["score"] for r in records], dtype=np.float64)
            out["operating_point"] = operating_point(labels != 0, scores, rule)
    if records and "dice" in records[0] and "dice" in metrics:
        per_case = np.asarray([r["dice"] for r in records], dtype=np.float64)  # (N, classes - 1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a class absent from every case: NaN (undefined)
            per_class = np.nanmean(per_case, axis=0) if per_case.size else np.array([])
            out["dice"] = float(np.nanmean(per_class)) if per_class.size else math.nan
        out["dice_per_class"] = [float(v) for v in per_class]
    return out


def abnormality(probs: np.ndarray) -> np.ndarray:
    """Probability of abnormality from class probabilities ``(N, C)``: ``1 - p(class 0)``.

    Class 0 is the normal (reference) class by medhybrid's convention; for two classes this is ``p(class 1)``.
    """
    return 1.0 - np.asarray(probs, dtype=np.float64)[:, 0]


def operating_point(abnormal: np.ndarray, score: np.ndarray, rule: EvalConfig | None = None) -> dict[str, Any]:
    """The decision threshold on ``score`` (probability of abnormality) and its sensitivity/specificity.

    ``abnormal`` is the boolean truth. A case is called abnormal when ``score >= threshold``. Rules
    (``rule.operating_point``): ``youden`` maximises sensitivity + specificity - 1 (ties: the higher
    threshold); ``MinSensitivity`` takes the highest threshold reaching the sensitivity; a float is used as
    given. The ROC points come from scikit-learn's ``roc_curve``.
    """
    from sklearn.metrics import roc_curve

    abnormal = np.asarray(abnormal, dtype=bool)
    score = np.asarray(score, dtype=np.float64)
    choice = rule.operating_point if rule is not None else "youden"
    fpr, tpr, thresholds = roc_curve(abnormal, score, drop_intermediate=False)
    # thresholds[0] is +inf (nothing called abnormal); it is never an operating point
    fpr, tpr, thresholds = fpr[1:], tpr[1:], thresholds[1:]
    if isinstance(choice, float):
        threshold, method = float(choice), "fixed"
    elif isinstance(choice, MinSensitivity):
        reach = np.flatnonzero(tpr >= choice.min_sensitivity)
        threshold, method = float(thresholds[reach[0]]), f"min_sensitivity={choice.min_sensitivity:g}"
    else:
        j = tpr - fpr
        threshold, method = float(thresholds[int(np.flatnonzero(j == j.max())[0])]), "youden"
    called = score >= threshold
    return {
        "threshold": min(max(threshold, 0.0), 1.0),
        "method": method,
        "sensitivity": float(called[abnormal].mean()),
        "specificity": float((~called[~abnormal]).mean()),
        "n_abnormal": int(abnormal.sum()),
        "n_normal": int((~abnormal).sum()),
    }


def is_better(value: float, best: float | None, metric: str) -> bool:
    """Higher is better except for loss; NaN never improves."""
    if value is None or math.isnan(value):
        return False
    if best is None or math.isnan(best):
        return True
    return value < best if metric == "loss" else value > best
