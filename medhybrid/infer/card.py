"""The model card a report shows: what the model is, what it was trained and measured on, and which
figures a reader may trust as an estimate of its accuracy.

The metrics of the best epoch were measured on the split that *chose* that epoch (``val``), so they are
optimistic and labelled so. A cross-validation run (``train --folds``) also carries its pooled
out-of-fold figures, which no model selection saw: those are the honest estimate.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from medhybrid.train.records import CV_DIR, METRICS_JSON, RUN_FILE

if TYPE_CHECKING:
    from medhybrid.infer.predictor import Predictor

SELECTION_NOTE = "measured on the split that selected the epoch: optimistic, not an estimate of accuracy"
INTENDED_USE = (
    "Research use only: decision support for radiologist review, not a diagnosis. Validated only on data like "
    "its training manifest; check the QC flags and the images."
)


def model_card(predictor: Predictor) -> dict[str, Any]:
    """What a reader of a report should know about the model (no patient data: checkpoints have none)."""
    ckpt = predictor.members[0].ckpt
    history = ckpt.get("history") or []
    best = ckpt.get("best") or {}
    best_epoch = best.get("epoch")
    record = next((r for r in history if r.get("epoch") == best_epoch), history[-1] if history else {})
    config = ckpt.get("config") or {}
    preprocessing = ckpt["preprocessing"]
    card: dict[str, Any] = {
        "model_name": predictor.model_name,
        "task": predictor.task,
        "label_names": predictor.label_names,
        "mask_label_names": predictor.mask_label_names,
        "mask_kinds": predictor.mask_kinds,
        "score": predictor.score_method,
        "pipeline": config.get("name"),
        "trained_epochs": _epochs_run(predictor, ckpt),
        "best_epoch": best_epoch,
        "selection_split": {
            "split": preprocessing.get("val_split", "val"),
            "note": SELECTION_NOTE,
            "metrics": {
                k[4:]: v for k, v in record.items() if k.startswith("val_") and isinstance(v, (int, float, list))
            },
        },
        "manifest_sha256": ckpt.get("manifest_sha256"),
        "calibration": {k: v for k, v in predictor.calibration.items() if k not in ("operating_point",)},
        "preprocessing": {
            k: preprocessing.get(k)
            for k in ("spatial_dims", "modality", "intensity", "spacing", "orientation", "spatial_size", "patch_size")
            if k in preprocessing
        },
        "versions": ckpt.get("versions") or {},
        "scope": predictor.scope.as_dict(),
        "intended_use": INTENDED_USE,
    }
    if predictor.ensemble is not None:
        card["ensemble"] = {
            "members": len(predictor.members),
            "kind": predictor.ensemble.get("kind", "cross-validation folds"),
            "combination": "mean of the members' logits (classification) and mask probabilities",
        }
        card["cross_validation"] = _cv_summary(predictor)
    return card


def _epochs_run(predictor: Predictor, ckpt: dict[str, Any]) -> Any:
    """Epochs the run trained in all (its run.json), not the best checkpoint's epoch; a bare checkpoint
    without its run folder says what it knows."""
    try:
        run = json.loads((predictor.path.parent / RUN_FILE).read_text(encoding="utf-8"))
        return int(run["epochs_run"])
    except (OSError, ValueError, KeyError, TypeError):
        return len(ckpt.get("history") or []) or ckpt.get("epoch")


def _cv_summary(predictor: Predictor) -> dict[str, Any] | None:
    """The pooled out-of-fold figures of a cross-validation run (``cv/metrics.json``), if written."""
    path = predictor.path.parent / CV_DIR / METRICS_JSON
    try:
        m = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    out: dict[str, Any] = {"folds": m.get("folds"), "n": m.get("n_studies"), "split": "out-of-fold"}
    cls = m.get("classification") or {}
    if cls.get("auroc"):
        out["auroc"] = {k: cls["auroc"].get(k) for k in ("value", "ci_low", "ci_high")}
    seg = (m.get("segmentation") or {}).get("mean") or {}
    if seg.get("dice"):
        out["dice"] = {k: seg["dice"].get(k) for k in ("value", "ci_low", "ci_high")}
    return out
