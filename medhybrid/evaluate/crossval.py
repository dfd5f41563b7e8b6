"""The pooled out-of-fold report of a cross-validation run (``medhybrid train --folds K``).

Each fold model is evaluated on its held-out fold (:func:`medhybrid.evaluate.runner.evaluate`, split
``test`` of the fold's manifest), with its temperature and threshold fitted on its inner validation fold,
so no number below was fitted or selected on the studies it is measured on. The K sets of predictions are
pooled, one row per study:

- rank metrics (AUROC with its CI, AP, curves) on the pooled **calibrated** probabilities: pooling ranks
  the scores of K different models against each other, and each model's raw scale is its own (a fold
  with sharper logits would push all its studies to the ends); each fold's temperature, fitted on its
  inner validation fold, puts them on one probability scale. The AUROC of every fold on its own (which
  no scale affects), their mean, and the pooled AUROC of the raw scores are given beside it. A
  segmentation-only lesion model has no temperature: its raw lesion scores are pooled;
- numbers at the operating point with each study called at its own fold's threshold;
- ECE of the probabilities calibrated with each study's own fold's temperature;
- Dice/HD95/NSD per study on the reference masks' grids, pooled.

The ensemble of the K models (``RUN/ensemble.json``, averaged by ``medhybrid infer --model RUN``) has no
split of its own to be calibrated on; its temperature and operating point are fitted on the pooled
out-of-fold logits and scores (``ensemble.calibration.json``), an approximation that the sidecar states.
"""

from __future__ import annotations

import csv
import io
import logging
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import roc_auc_score

from medhybrid import __version__
from medhybrid.config import PipelineConfig
from medhybrid.evaluate import metrics as M
from medhybrid.evaluate.classification import Fitted, Scored, fit, rank_metrics, stack_logits
from medhybrid.evaluate.html import evaluation_html
from medhybrid.evaluate.runner import PREDICTIONS_FILE, REPORT_FILE, EvaluateOptions, StudyRecord, evaluate
from medhybrid.evaluate.segmentation import segmentation_summary
from medhybrid.infer.loading import checkpoints_digest
from medhybrid.io.manifest import read_manifest
from medhybrid.io.writers import atomic_write_bytes, sha256_file
from medhybrid.train import records
from medhybrid.train.checkpoint import load_checkpoint, write_calibration
from medhybrid.train.evaluate import abnormality

logger = logging.getLogger(__name__)


def pooled_evaluation(
    run_dir: Path,
    fold_dirs: Sequence[Path],
    cfg: PipelineConfig,
    *,
    n_boot: int = 2000,
    seed: int = 0,
    on_event: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Evaluate every fold model on its held-out fold, pool, and write ``RUN/cv`` and ``RUN/ensemble.json``."""
    say = on_event or (lambda msg: logger.info("%s", msg))
    cv_dir = Path(run_dir) / records.CV_DIR
    results = []
    for fold, fold_dir in enumerate(fold_dirs):
        options = EvaluateOptions(
            split="test", calibration_split="val", saliency=False, n_boot=n_boot, seed=seed, report=False
        )
        res = evaluate(fold_dir, fold_dir / "manifest.csv", fold_dir / "oof", options)
        say(f"fold {fold}: {len(res.records) - len(res.failed)} out-of-fold studies evaluated")
        results.append(res)
    grouped = read_manifest(cfg.data.manifest).has_patients
    digest = checkpoints_digest([Path(d) / records.BEST_FILE for d in fold_dirs])
    ok = [(k, r) for k, res in enumerate(results) for r in res.records if r.status == "ok"]
    first = results[0].metrics
    result: dict[str, Any] = {
        "model": {
            **first["model"],
            "checkpoint": f"{len(fold_dirs)} fold models ({records.ENSEMBLE_FILE})",
            "weights_sha256": digest,
            "members": len(fold_dirs),
        },
        "manifest": str(cfg.data.manifest),
        "split": "out-of-fold",
        "calibration_split": "each fold's inner validation fold",
        "splits": {
            "evaluated": "out-of-fold (each study by the one fold model that never saw it)",
            "calibration": "the inner validation fold of each fold model",
            "selection": "the inner validation fold of each fold model",
            "training": "the other K-2 folds",
        },
        "folds": len(fold_dirs),
        "n_studies": sum(len(res.records) for res in results),
        "n_failed": sum(len(res.failed) for res in results),
        "failed": [f for res in results for f in res.metrics["failed"]],
        "bootstrap": {**first["bootstrap"], "n_boot": n_boot},
        "medhybrid_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    per_fold = [_fold_summary(k, res.metrics) for k, res in enumerate(results)]
    result["per_fold"] = per_fold
    seconds = [res.metrics["seconds_per_study"] for res in results if res.metrics.get("seconds_per_study")]
    result["seconds_per_study"] = float(np.median(seconds)) if seconds else None
    scored = [(k, r) for k, r in ok if r.label is not None and r.score is not None]
    ensemble_fit: Fitted | None = None
    if scored and all("classification" in res.metrics for res in results):
        result["classification"], ensemble_fit = _pooled_classification(scored, per_fold, cfg, grouped, n_boot, seed)
    seg = [(k, r) for k, r in ok if r.seg is not None]
    if seg:
        result["segmentation"] = segmentation_summary(
            [r.seg for _, r in seg if r.seg is not None],
            _mask_names(fold_dirs),
            groups=[r.group for _, r in seg] if grouped else None,
            n_boot=n_boot,
            seed=seed,
        )
    cv_dir.mkdir(parents=True, exist_ok=True)
    records.write_json(cv_dir / records.METRICS_JSON, result)
    atomic_write_bytes(cv_dir / PREDICTIONS_FILE, _pooled_csv(fold_dirs))
    atomic_write_bytes(cv_dir / REPORT_FILE, evaluation_html(result))
    _write_ensemble(Path(run_dir), fold_dirs, cfg, ensemble_fit, len(scored), digest)
    return result


def _fold_summary(k: int, m: dict[str, Any]) -> dict[str, Any]:
    c = m.get("classification") or {}
    s = (m.get("segmentation") or {}).get("mean") or {}
    return {
        "fold": k,
        "n": m["n_studies"] - m["n_failed"],
        "auroc": (c.get("auroc") or {}).get("value"),
        "temperature": c.get("temperature"),
        "threshold": (c.get("operating_point") or {}).get("threshold"),
        "dice": (s.get("dice") or {}).get("value"),
    }


def _pooled_classification(
    scored: list[tuple[int, StudyRecord]],
    per_fold: list[dict[str, Any]],
    cfg: PipelineConfig,
    grouped: bool,
    n_boot: int,
    seed: int,
) -> tuple[dict[str, Any], Fitted]:
    recs = [r for _, r in scored]
    fold = np.asarray([k for k, _ in scored])
    s = Scored(
        labels=np.asarray([r.label for r in recs], dtype=int),
        scores=np.asarray([r.score for r in recs], dtype=np.float64),
        logits=stack_logits([r.logits for r in recs]),
        groups=np.asarray([r.group for r in recs]) if grouped else None,
    )
    temperature = np.asarray([per_fold[k]["temperature"] or 1.0 for k in fold])
    thresholds = np.asarray([per_fold[k]["threshold"] for k in fold], dtype=np.float64)
    probs = None
    calibrated = s.scores
    if s.logits is not None:
        probs = np.stack([M.softmax_t(s.logits[i : i + 1], temperature[i])[0] for i in range(len(s))])
        calibrated = abnormality(probs)
    pooled = Scored(s.labels, calibrated, None, s.groups)
    out: dict[str, Any] = {
        "n": len(s),
        "score": "classifier" if s.logits is not None else "lesion score",
        "rank_metrics_on": (
            "pooled out-of-fold probabilities, each calibrated by its fold's temperature (fitted on that fold's "
            "inner validation fold)"
            if probs is not None
            else "pooled raw out-of-fold lesion scores"
        ),
        **rank_metrics(pooled, n_boot=n_boot, seed=seed),
        "auroc_per_fold": [f["auroc"] for f in per_fold],
        "auroc_mean_of_folds": float(np.nanmean([np.nan if f["auroc"] is None else f["auroc"] for f in per_fold])),
        "auroc_pooled_raw": float(roc_auc_score(s.labels != 0, s.scores)) if len(set(s.labels != 0)) == 2 else None,
        "protocol": "out-of-fold: each study scored by the fold model that never saw it, at that model's temperature "
        "and threshold (fitted on its inner validation fold)",
        "temperature": float(np.mean(temperature)),
    }
    if probs is not None and s.logits is not None:
        out["accuracy_argmax"] = float((probs.argmax(1) == s.labels).mean())
        out["calibration"] = {
            "before": M.calibration_bins(s.labels, M.softmax_t(s.logits, 1.0)),
            "after": M.calibration_bins(s.labels, probs),
        }
    at_op = M.binary_metrics(s.labels != 0, (calibrated >= thresholds).astype(float), 0.5)
    at_op["threshold"] = float(np.mean(thresholds))
    out["at_operating_point"] = at_op
    default = Fitted(1.0, {"threshold": 0.5, "method": "default (the out-of-fold studies are of one class)"})
    return out, fit(s, cfg.eval.operating_point, default)


def _mask_names(fold_dirs: Sequence[Path]) -> dict[int, str]:
    ckpt = load_checkpoint(Path(fold_dirs[0]) / records.BEST_FILE)
    return {int(k): str(v) for k, v in (ckpt.get("mask_label_names") or {}).items()}


def _pooled_csv(fold_dirs: Sequence[Path]) -> bytes:
    """The folds' out-of-fold ``predictions.csv`` concatenated, with a ``fold`` column first."""
    header: list[str] = []
    rows: list[list[Any]] = []
    for k, fold_dir in enumerate(fold_dirs):
        with open(Path(fold_dir) / "oof" / PREDICTIONS_FILE, newline="", encoding="utf-8") as fh:
            reader = csv.reader(fh)
            header = ["fold", *next(reader)]
            rows += [[k, *row] for row in reader]
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue().encode()


def _write_ensemble(
    run_dir: Path, fold_dirs: Sequence[Path], cfg: PipelineConfig, fitted: Fitted | None, n_scored: int, digest: str
) -> None:
    """``ensemble.json`` (the fold models, what they were trained on) and its calibration sidecar."""
    members = [str((Path(d) / records.BEST_FILE).relative_to(run_dir)) for d in fold_dirs]
    records.write_json(
        run_dir / records.ENSEMBLE_FILE,
        {
            "kind": "cross-validation folds",
            "members": members,
            "folds": len(members),
            "manifest": str(cfg.data.manifest),
            "manifest_sha256": sha256_file(cfg.data.manifest),
            "pooled_splits": [cfg.data.train_split, cfg.data.val_split],
            "combination": "mean of the members' logits (classification) and mask probabilities",
        },
    )
    if fitted is None:
        return
    write_calibration(
        run_dir / records.ENSEMBLE_FILE,
        {
            "temperature": fitted.temperature,
            "operating_point": fitted.operating_point,
            "n": n_scored,
            "fitted_on": "pooled out-of-fold predictions of the fold models (each study by one fold model); "
            "applied to the ensemble's mean logits, an approximation",
        },
        digest,
    )
