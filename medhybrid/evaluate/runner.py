"""``medhybrid evaluate``: a trained model against one split of a manifest, with honest uncertainty.

Order of work:

1. The calibration split (``val`` by default) is predicted first, without saliency. On it, the
   temperature is fitted (negative log-likelihood) and the operating point chosen on the calibrated
   probabilities (Youden, or a target sensitivity, as the pipeline's ``eval.operating_point`` or
   ``--operating-point`` says). Both are written into the checkpoint (``calibration``), where
   ``medhybrid infer`` reads them.
2. The evaluated split is predicted with saliency; each study gets its classification scores, its
   segmentation metrics on the scan's own grid (:mod:`medhybrid.evaluate.segmentation`), its saliency
   maps saved as NIfTI on the model grid, and a deletion curve (:mod:`medhybrid.evaluate.faithfulness`).
3. Metrics with CIs go to ``metrics.json``, per-study rows to ``predictions.csv``, the plots to
   ``report.html``.

When the evaluated split *is* the calibration split (the MedMNIST and Hippocampus manifests have no test
split), the numbers at the operating point and the calibrated ECE are cross-fitted: the studies are split
in two stratified halves, each half is scored with the temperature and threshold fitted on the other, and
the counts are pooled. Fitting and scoring on the same studies would flatter both. AUROC does not depend
on either and is computed on all studies.

A study that cannot be read or run is recorded as failed (``predictions.csv``, ``metrics.json``) and the
run goes on.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import re
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medhybrid import __version__
from medhybrid.config import EvalConfig, MinSensitivity
from medhybrid.errors import InputError, MedHybridError
from medhybrid.evaluate import bootstrap as B
from medhybrid.evaluate import metrics as M
from medhybrid.evaluate.faithfulness import DEFAULT_STEPS, deletion_scores
from medhybrid.evaluate.segmentation import DEFAULT_NSD_TOLERANCE_MM, METRICS, segmentation_scores
from medhybrid.infer.predictor import Predictor
from medhybrid.infer.resample import argmax_labels, lift_affine, to_native
from medhybrid.infer.saliency import SALIENCY_METHODS
from medhybrid.io.manifest import ManifestRow, read_manifest
from medhybrid.io.readers import read_image
from medhybrid.io.scan import load_study
from medhybrid.io.writers import atomic_write_bytes, save_nifti
from medhybrid.train.checkpoint import load_checkpoint, save_checkpoint
from medhybrid.train.evaluate import abnormality, operating_point
from medhybrid.train.records import write_json

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
PREDICTIONS_FILE = "predictions.csv"
REPORT_FILE = "report.html"
CURVE_POINTS = 200
EPS = 1e-7


@dataclass
class EvaluateOptions:
    """Options of one evaluation (see the CLI help of ``medhybrid evaluate``)."""

    split: str = "test"
    calibration_split: str = "val"
    operating_point: str | None = None  # "youden", "sensitivity=0.9", a probability; None: the pipeline's
    n_boot: int = B.DEFAULT_BOOTSTRAP
    seed: int = 0
    device: str = "auto"
    tta: bool = False
    saliency: bool = True
    deletion_steps: int = DEFAULT_STEPS
    max_faithfulness: int = 200
    store_calibration: bool = True
    nsd_tolerance_mm: float = DEFAULT_NSD_TOLERANCE_MM
    limit: int | None = None
    report: bool = True


@dataclass
class StudyRecord:
    """What one study contributed."""

    study_id: str
    split: str
    label: int | None
    status: str = "ok"
    error: str | None = None
    class_probs: np.ndarray | None = None
    seg: dict[str, list[float]] | None = None
    deletion: dict[str, dict[str, Any]] | None = None
    saliency_files: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0


@dataclass
class EvaluateResult:
    out: Path
    metrics: dict[str, Any]
    records: list[StudyRecord]

    @property
    def failed(self) -> list[StudyRecord]:
        return [r for r in self.records if r.status != "ok"]


def parse_operating_point(text: str | None, default: Any) -> Any:
    """``youden`` | ``sensitivity=0.9`` | ``0.35`` -> the ``EvalConfig.operating_point`` value."""
    if text is None:
        return default
    text = text.strip().lower()
    if text == "youden":
        return "youden"
    if text.startswith("sensitivity="):
        return MinSensitivity(min_sensitivity=float(text.split("=", 1)[1]))
    try:
        return EvalConfig(operating_point=float(text)).operating_point
    except (ValueError, TypeError):
        raise InputError(
            f"--operating-point {text!r} is not understood", fix="use youden, sensitivity=0.9 or a probability"
        ) from None


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)[:120] or "study"


class _Evaluator:
    def __init__(self, predictor: Predictor, options: EvaluateOptions, out: Path, n_seg: int) -> None:
        self.p = predictor
        self.o = options
        self.out = out
        self.n_seg = n_seg
        self.faithful_done = 0
        self.model_threshold: float | None = None  # calibrated threshold, once fitted
        self.temperature = 1.0
        self.can_delete = predictor.model.num_classes > 0 and not predictor.sliding

    def score(self, batch: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            logits = self.p.model(batch.to(self.p.device))["logits"].float()
        return 1.0 - torch.softmax(logits / self.temperature, 1)[:, 0]

    def study(self, row: ManifestRow, explain: bool) -> StudyRecord:
        rec = StudyRecord(row.study_id, row.split, row.label)
        t0 = time.perf_counter()
        try:
            study = load_study(row.image)
            prepared = self.p.preprocess(study)
            pred = self.p.run(prepared, explain=explain)
            rec.class_probs = pred.class_probs
            if row.mask is not None and pred.seg_probs is not None:
                ref = read_image(row.mask, dtype=np.int16).array
                ref = ref[..., 0] if ref.ndim == 4 else ref
                labels = to_native(pred.seg_probs, pred.affine, study.affine, study.spatial_shape, argmax_labels)
                rec.seg = segmentation_scores(
                    labels, ref, study.spacing, self.n_seg, nsd_tolerance_mm=self.o.nsd_tolerance_mm
                )
            if explain and pred.saliency:
                folder = self.out / "saliency"
                folder.mkdir(exist_ok=True)
                for method, sal in pred.saliency.items():
                    arr = sal[0].numpy().astype(np.float32)
                    arr = arr[..., None] if arr.ndim == 2 else arr
                    name = f"{_safe(row.study_id)}_{method}.nii.gz"
                    save_nifti(arr, lift_affine(pred.affine), folder / name)
                    rec.saliency_files[method] = f"saliency/{name}"
                if self._wants_deletion(pred.probability):
                    rec.deletion = deletion_scores(
                        self.score,
                        prepared.x.to(self.p.device),
                        {m: s.to(self.p.device) for m, s in pred.saliency.items()},
                        steps=self.o.deletion_steps,
                        seed=self.o.seed,
                    )
                    self.faithful_done += 1
        except Exception as exc:  # noqa: BLE001 - recorded per study, the run goes on
            rec.status = "failed"
            if isinstance(exc, MedHybridError):
                rec.error = f"{exc.code}: {exc}"
                logger.warning("study %s failed: %s", row.study_id, exc)
            else:
                rec.error = f"{type(exc).__name__}: {str(exc)[:300]}"
                logger.error("study %s failed unexpectedly", row.study_id, exc_info=exc)
        rec.seconds = time.perf_counter() - t0
        return rec

    def _wants_deletion(self, raw_probability: float) -> bool:
        """Deletion curves for studies called abnormal (the maps explain abnormality), up to the cap."""
        if not self.can_delete or self.faithful_done >= self.o.max_faithfulness:
            return False
        if self.model_threshold is None:  # not fitted yet (evaluating the calibration split): training's threshold
            return raw_probability >= self.p.threshold
        p = _calibrate_probability(raw_probability, self.temperature)
        return p >= self.model_threshold


def _calibrate_probability(p_abnormal: float, temperature: float) -> float:
    """Binary case: ``sigmoid(logit(p) / T)``."""
    p = min(max(p_abnormal, EPS), 1 - EPS)
    return float(1.0 / (1.0 + math.exp(-math.log(p / (1 - p)) / temperature)))


def _logits(records: Sequence[StudyRecord]) -> np.ndarray:
    """Log class probabilities: logits up to a per-row constant, which softmax ignores."""
    probs = np.asarray([r.class_probs for r in records], dtype=np.float64)
    return np.log(np.clip(probs, EPS, 1.0))


def _curve(x: np.ndarray, y: np.ndarray, t: np.ndarray | None = None) -> dict[str, list[float]]:
    """Curve points, thinned evenly to at most ``CURVE_POINTS`` (for plots; metrics use all points)."""
    idx = np.unique(np.linspace(0, len(x) - 1, min(len(x), CURVE_POINTS)).round().astype(int))
    out = {"x": [float(v) for v in x[idx]], "y": [float(v) for v in y[idx]]}
    if t is not None:
        out["threshold"] = [float(min(v, 1.0)) for v in t[idx]]
    return out


def _fit(logits: np.ndarray, labels: np.ndarray, rule: Any) -> tuple[float, dict[str, Any]]:
    temperature = M.fit_temperature(logits, labels)
    scores = abnormality(M.softmax_t(logits, temperature))
    return temperature, operating_point(labels != 0, scores, EvalConfig(operating_point=rule))


def _crossfit(
    logits: np.ndarray, labels: np.ndarray, rule: Any, seed: int
) -> tuple[np.ndarray, np.ndarray, list[dict[str, Any]]]:
    """Two stratified halves, each scored with the temperature and threshold fitted on the other.

    Returns per-study calibrated probabilities ``(N, C)``, per-study thresholds ``(N,)`` and the folds."""
    rng = np.random.default_rng(seed)
    fold = np.zeros(len(labels), dtype=int)
    for cls in np.unique(labels != 0):
        idx = np.flatnonzero((labels != 0) == cls)
        rng.shuffle(idx)
        fold[idx[1::2]] = 1
    probs = np.zeros_like(logits)
    thresholds = np.zeros(len(labels))
    folds = []
    for k in (0, 1):
        fit, test = fold != k, fold == k
        t, op = _fit(logits[fit], labels[fit], rule)
        probs[test] = M.softmax_t(logits[test], t)
        thresholds[test] = op["threshold"]
        folds.append({"temperature": t, "threshold": op["threshold"], "n_fit": int(fit.sum())})
    return probs, thresholds, folds


def classification_metrics(
    records: Sequence[StudyRecord],
    calibration: Sequence[StudyRecord] | None,
    rule: Any,
    stored_op: dict[str, Any],
    *,
    n_boot: int,
    seed: int,
    label_names: dict[int, str],
) -> tuple[dict[str, Any], dict[str, Any] | None, np.ndarray, np.ndarray]:
    """Metrics of the evaluated studies; the calibration to store (or None); per-study calibrated
    probability of abnormality and decision threshold.

    ``calibration`` None: no calibration split (raw probabilities, the checkpoint's threshold); the same
    records as ``records``: cross-fitted (module docstring); other records: fitted on them.
    """
    labels = np.asarray([r.label for r in records], dtype=int)
    logits = _logits(records)
    raw = M.softmax_t(logits, 1.0)
    out: dict[str, Any] = {"n": len(records), "label_names": {str(k): v for k, v in label_names.items()}}
    to_store: dict[str, Any] | None = None
    if calibration is None:
        probs, thresholds = raw, np.full(len(labels), float(stored_op["threshold"]))
        out["protocol"] = "no calibration split: raw probabilities, the threshold stored at training"
        out["temperature"] = 1.0
    else:
        cal_labels = np.asarray([r.label for r in calibration], dtype=int)
        cal_logits = _logits(calibration)
        t, op = _fit(cal_logits, cal_labels, rule)
        ece_before = M.calibration_bins(cal_labels, M.softmax_t(cal_logits, 1.0))["ece"]
        ece_after = M.calibration_bins(cal_labels, M.softmax_t(cal_logits, t))["ece"]
        to_store = {
            "temperature": t,
            "operating_point": op,
            "n": len(cal_labels),
            "ece_before": ece_before,
            "ece_after": ece_after,
        }
        out["temperature"] = t
        if calibration is records:
            probs, thresholds, folds = _crossfit(logits, labels, rule, seed)
            out["protocol"] = (
                "cross-fitted: the evaluated split is the calibration split, so each stratified half is scored "
                "with the temperature and threshold fitted on the other half"
            )
            out["folds"] = folds
        else:
            probs, thresholds = M.softmax_t(logits, t), np.full(len(labels), op["threshold"])
            out["protocol"] = "temperature and threshold fitted on the calibration split"
        out["operating_point"] = op
    score = abnormality(probs)
    abnormal = labels != 0
    out["auroc"] = B.auroc_ci(abnormal, score, n_boot=n_boot, seed=seed)
    called = score >= thresholds
    at_op = M.binary_metrics(abnormal, called.astype(float), 0.5)
    at_op["threshold"] = float(np.mean(thresholds))
    out["at_operating_point"] = at_op
    out["accuracy_argmax"] = float((probs.argmax(1) == labels).mean())
    out["calibration"] = {
        "before": M.calibration_bins(labels, raw),
        "after": M.calibration_bins(labels, probs),
    }
    from sklearn.metrics import average_precision_score, precision_recall_curve, roc_curve

    if abnormal.any() and (~abnormal).any():
        fpr, tpr, thr = roc_curve(abnormal, score)
        prec, rec, _ = precision_recall_curve(abnormal, score)
        out["roc_curve"] = _curve(fpr, tpr, thr)
        out["pr_curve"] = _curve(rec[::-1], prec[::-1])
        out["average_precision"] = float(average_precision_score(abnormal, score))
    return out, to_store, score, thresholds


def segmentation_summary(
    records: Sequence[StudyRecord], class_names: dict[int, str], *, n_boot: int, seed: int
) -> dict[str, Any]:
    """Mean and CI per metric per class, and of the per-study class mean."""
    out: dict[str, Any] = {"n": len(records), "per_class": {}, "mean": {}}
    for metric in METRICS:
        table = np.asarray([r.seg[metric] for r in records if r.seg], dtype=np.float64)  # (N, classes)
        for c in range(table.shape[1]):
            name = class_names.get(c + 1, f"class {c + 1}")
            entry = out["per_class"].setdefault(name, {})
            entry[metric] = B.mean_ci(table[:, c], n_boot=n_boot, seed=seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a study with every class empty: NaN, excluded
            per_study = np.nanmean(table, axis=1)
        out["mean"][metric] = B.mean_ci(per_study, n_boot=n_boot, seed=seed)
        if metric == "dice":
            out["n_both_empty"] = int(np.isnan(table).sum())  # (study, class) pairs with nothing on either side
    return out


def faithfulness_summary(records: Sequence[StudyRecord], *, n_boot: int, seed: int) -> dict[str, Any]:
    done = [r.deletion for r in records if r.deletion]
    if not done:
        return {}
    out: dict[str, Any] = {"n": len(done)}
    for name in done[0]:
        curves = np.asarray([d[name]["curve"] for d in done])
        entry: dict[str, Any] = {
            "mean_curve": curves.mean(0).tolist(),
            "auc": B.mean_ci(np.asarray([d[name]["auc"] for d in done]), n_boot=n_boot, seed=seed),
        }
        if name != "random":
            entry["faithfulness"] = B.mean_ci(
                np.asarray([d[name]["faithfulness"] for d in done]), n_boot=n_boot, seed=seed
            )
        out[name] = entry
    return out


def evaluate(
    model: Path,
    manifest: Path,
    out: Path,
    options: EvaluateOptions | None = None,
    *,
    on_study: Callable[[StudyRecord], None] | None = None,
) -> EvaluateResult:
    """Evaluate ``model`` (run folder or checkpoint) on ``options.split`` of ``manifest`` into ``out``.

    Raises:
        InputError: the split has no studies; CheckpointError/ManifestError from loading.
    """
    o = options or EvaluateOptions()
    t_start = time.perf_counter()
    predictor = Predictor(
        Path(model), device=o.device, tta=o.tta, saliency=SALIENCY_METHODS if o.saliency else (), temperature=1.0
    )
    mf = read_manifest(Path(manifest))
    rows = mf.split(o.split)[: o.limit]
    if not rows:
        raise InputError(
            f"split {o.split!r} has no studies (splits here: {', '.join(mf.splits()) or 'none'})",
            path=mf.path,
            fix="choose one with --split",
        )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    classify = predictor.model.num_classes > 0 and predictor.task != "segmentation"
    classify = classify and any(r.label is not None for r in rows)
    n_seg = int(predictor.model.seg_classes or 0)
    ev = _Evaluator(predictor, o, out, n_seg)

    config_eval = (predictor.config.get("eval") or {}) if predictor.config else {}
    default_rule = EvalConfig.model_validate(config_eval).operating_point if config_eval else "youden"
    rule = parse_operating_point(o.operating_point, default_rule)

    records: list[StudyRecord] = []
    calibration: list[StudyRecord] | None = None
    if classify and o.calibration_split != o.split:
        cal_rows = [r for r in mf.split(o.calibration_split)[: o.limit] if r.label is not None]
        if cal_rows:
            logger.info("calibration: %d studies of split %s", len(cal_rows), o.calibration_split)
            calibration = [ev.study(r, explain=False) for r in cal_rows]
            for rec in calibration:
                if on_study:
                    on_study(rec)
            calibration = [r for r in calibration if r.status == "ok"]
            if calibration:
                t, op = _fit(_logits(calibration), np.asarray([r.label for r in calibration]), rule)
                ev.temperature, ev.model_threshold = t, op["threshold"]
            else:
                calibration = None
    for row in rows:
        rec = ev.study(row, explain=o.saliency)
        records.append(rec)
        if on_study:
            on_study(rec)
    ok = [r for r in records if r.status == "ok"]

    result: dict[str, Any] = {
        "model": {
            "name": predictor.model_name,
            "checkpoint": str(predictor.path),
            "weights_sha256": predictor.weights_sha256,
            "task": predictor.task,
        },
        "manifest": str(mf.path),
        "split": o.split,
        "calibration_split": o.calibration_split,
        "n_studies": len(records),
        "n_failed": len(records) - len(ok),
        "failed": [{"study_id": r.study_id, "error": r.error} for r in records if r.status != "ok"],
        "bootstrap": {"n_boot": o.n_boot, "seed": o.seed, "level": 0.95, "method": "percentile"},
        "tta": o.tta,
        "medhybrid_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    scores = thresholds = None
    labelled = [r for r in ok if r.label is not None and r.class_probs is not None]
    if classify and labelled:
        cal = labelled if (o.calibration_split == o.split) else calibration
        result["classification"], to_store, scores, thresholds = classification_metrics(
            labelled,
            cal,
            rule,
            predictor.operating_point,
            n_boot=o.n_boot,
            seed=o.seed,
            label_names=predictor.label_names,
        )
        if to_store and o.store_calibration:
            to_store["fitted_on"] = f"{mf.path.name}:{o.calibration_split}"
            to_store["created"] = result["created"]
            _store_calibration(predictor.path, to_store)
            result["calibration_stored_in"] = str(predictor.path)
    seg_records = [r for r in ok if r.seg is not None]
    if seg_records:
        result["segmentation"] = segmentation_summary(
            seg_records, predictor.mask_label_names, n_boot=o.n_boot, seed=o.seed
        )
        result["segmentation"]["nsd_tolerance_mm"] = o.nsd_tolerance_mm
        result["segmentation"]["empty_mask_rule"] = (
            "both empty: excluded (counted); one side empty: Dice 0, NSD 0, HD95 = image diagonal"
        )
    faith = faithfulness_summary(ok, n_boot=o.n_boot, seed=o.seed)
    if faith:
        faith["steps"] = o.deletion_steps
        faith["selection"] = "studies called abnormal at the operating point (at most --max-faithfulness)"
        result["faithfulness"] = faith
    seconds = [r.seconds for r in ok]
    result["seconds_per_study"] = float(np.median(seconds)) if seconds else None
    result["wall_seconds"] = time.perf_counter() - t_start

    score_of = dict(zip((r.study_id for r in labelled), scores, strict=True)) if scores is not None else {}
    thr_of = dict(zip((r.study_id for r in labelled), thresholds, strict=True)) if thresholds is not None else {}
    atomic_write_bytes(out / PREDICTIONS_FILE, _predictions_csv(records, predictor, score_of, thr_of))
    write_json(out / METRICS_FILE, result)
    if o.report:
        from medhybrid.evaluate.html import evaluation_html

        atomic_write_bytes(out / REPORT_FILE, evaluation_html(result))
    return EvaluateResult(out, result, records)


def _store_calibration(path: Path, calibration: dict[str, Any]) -> None:
    """Write ``calibration`` into the checkpoint (atomically); the weights are unchanged."""
    payload = load_checkpoint(path)
    payload["calibration"] = calibration
    save_checkpoint(path, {k: v for k, v in payload.items() if k not in ("format", "format_version")})


def _predictions_csv(
    records: Sequence[StudyRecord], predictor: Predictor, score_of: dict[str, float], thr_of: dict[str, float]
) -> bytes:
    class_names = [predictor.label_names.get(i, f"class {i}") for i in range(predictor.model.num_classes)]
    seg_names = [predictor.mask_label_names.get(c, f"class {c}") for c in range(1, predictor.model.seg_classes)]
    methods = sorted({m for r in records if r.deletion for m in r.deletion if m != "random"})
    header = ["study_id", "split", "status", "label", "probability", "probability_raw", "threshold", "decision"]
    header += [f"p_{_safe(n)}" for n in class_names]
    if any(r.seg for r in records):
        header += [f"{m}_{_safe(n)}" for n in seg_names for m in METRICS]
    header += [f"faithfulness_{m}" for m in methods] + ["saliency_files", "seconds", "error"]
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(header)

    def fmt(v: float | None) -> str:
        return "" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.6g}"

    for r in records:
        row: list[Any] = [r.study_id, r.split, r.status, "" if r.label is None else r.label]
        p = score_of.get(r.study_id)
        raw = float(abnormality(r.class_probs[None])[0]) if r.class_probs is not None else None
        thr = thr_of.get(r.study_id)
        decision = "" if p is None or thr is None else ("abnormal" if p >= thr else "normal")
        row += [fmt(p), fmt(raw), fmt(thr), decision]
        row += [fmt(float(v)) for v in r.class_probs] if r.class_probs is not None else [""] * len(class_names)
        if any(x.seg for x in records):
            for c in range(len(seg_names)):
                row += [fmt(r.seg[m][c]) if r.seg else "" for m in METRICS]
        row += [fmt(r.deletion[m]["faithfulness"]) if r.deletion and m in r.deletion else "" for m in methods]
        row += [";".join(r.saliency_files.values()), f"{r.seconds:.3f}", r.error or ""]
        writer.writerow(row)
    return buf.getvalue().encode()
