"""``medhybrid evaluate``: a trained model against one split of a manifest, with honest uncertainty.

Order of work:

1. The calibration split (``val`` by default) is predicted first, without saliency. On it, the
   temperature is fitted (negative log-likelihood of the logits) and the operating point chosen on the
   calibrated scores (Youden, or a target sensitivity, as the pipeline's ``eval.operating_point`` or
   ``--operating-point`` says). Both go into the model's calibration sidecar, where ``medhybrid infer``
   reads them; the checkpoint itself is never rewritten.
2. The evaluated split is predicted with saliency; each study gets its classification scores, its
   segmentation metrics on the reference mask's own grid (:mod:`medhybrid.evaluate.segmentation`), its
   saliency maps saved as NIfTI on the model grid, and a deletion curve (:mod:`medhybrid.evaluate.faithfulness`).
3. Metrics with CIs (:mod:`medhybrid.evaluate.classification` for the study level) go to ``metrics.json``,
   per-study rows to ``predictions.csv``, the plots to ``report.html``.

``metrics.json`` says which split every figure comes from (``splits``): the evaluated one, the one the
temperature and threshold were fitted on, and the one that chose the model's epoch. A figure measured on
the split that selected the model is optimistic, and is flagged so.

The study's truth is its manifest label; a segmentation-only lesion model evaluated on studies without a
label takes it from the reference mask (abnormal when it holds a lesion voxel). CIs resample patients
where the manifest has a ``patient_id`` column, studies otherwise.

A study that cannot be read or run is recorded as failed (``predictions.csv``, ``metrics.json``) and the
run goes on.

``metrics.json`` is the mark of a finished evaluation: a stale one is deleted when the run starts, and it is
written last (every file atomically), so a folder without it holds an evaluation that was stopped, whatever
``predictions.csv``, ``report.html`` or ``saliency/`` it already has. Rerun the same command to redo it.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medhybrid import __version__
from medhybrid.config import EvalConfig, MinSensitivity
from medhybrid.data.transforms import frame_affine, png_mask_on_image
from medhybrid.errors import InputError, MedHybridError
from medhybrid.evaluate import bootstrap as B
from medhybrid.evaluate.classification import Fitted, Scored, classification_metrics, fit, stack_logits
from medhybrid.evaluate.faithfulness import DEFAULT_STEPS, deletion_scores, faithfulness_summary
from medhybrid.evaluate.segmentation import (
    DEFAULT_NSD_TOLERANCE_MM,
    METRICS,
    score_against_reference,
    segmentation_summary,
)
from medhybrid.evaluate.shift import shift_study
from medhybrid.evaluate.study_score import reference_abnormal
from medhybrid.infer.predictor import Predictor
from medhybrid.infer.resample import lift_affine
from medhybrid.infer.saliency import SALIENCY_METHODS
from medhybrid.io.manifest import ManifestRow, read_manifest
from medhybrid.io.readers import read_image
from medhybrid.io.scan import load_study
from medhybrid.io.study import Study
from medhybrid.io.writers import atomic_write_bytes, save_nifti, sha256_file
from medhybrid.train.checkpoint import calibration_path, write_calibration
from medhybrid.train.evaluate import abnormality
from medhybrid.train.records import METRICS_JSON, fault_point, write_json

logger = logging.getLogger(__name__)

METRICS_FILE = METRICS_JSON
PREDICTIONS_FILE = "predictions.csv"
REPORT_FILE = "report.html"


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
    shift: str | None = None  # an acquisition shift applied to the evaluated split (medhybrid.evaluate.shift)


@dataclass
class StudyRecord:
    """What one study contributed."""

    study_id: str
    split: str
    label: int | None
    group: str = ""
    status: str = "ok"
    error: str | None = None
    class_probs: np.ndarray | None = None  # at temperature 1
    logits: np.ndarray | None = None
    score: float | None = None  # raw study score
    seg: dict[str, list[float]] | None = None
    seg_resampled: bool = False  # the prediction was scored on a mask grid other than the image's
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

    def score(self, batch: torch.Tensor) -> torch.Tensor:
        """The calibrated probability of abnormality of a batch, from the members' mean logits."""
        with torch.no_grad():
            logits = torch.stack([m.model(batch.to(self.p.device))["logits"].float() for m in self.p.members]).mean(0)
        return 1.0 - torch.softmax(logits / self.temperature, 1)[:, 0]

    def study(self, row: ManifestRow, explain: bool) -> StudyRecord:
        rec = StudyRecord(row.study_id, row.split, row.label, group=row.group)
        t0 = time.perf_counter()
        try:
            study = load_study(row.image)
            if self.o.shift is not None and row.split == self.o.split:  # the calibration split stays clean
                study = shift_study(study, self.o.shift, self.o.seed)
            prepared = self.p.preprocess(study)
            pred = self.p.run(prepared, explain=explain)
            rec.logits, rec.score = pred.logits, pred.probability
            rec.class_probs = pred.class_probs
            if row.mask is not None and pred.seg_probs is not None:
                ref = read_image(row.mask, dtype=np.int16)
                labels = ref.array[..., 0] if ref.array.ndim == 4 else ref.array
                if rec.label is None and self.p.lesions:
                    rec.label = int(reference_abnormal(labels, self.p.lesions))
                ref_affine, ref_spacing = self._reference_grid(ref, study)
                rec.seg, rec.seg_resampled = score_against_reference(
                    pred.seg_probs,
                    pred.affine,
                    (pred.native_affine, study.spatial_shape),
                    (labels, ref_affine, ref.spatial_shape),
                    ref_spacing,
                    self.n_seg,
                    nsd_tolerance_mm=self.o.nsd_tolerance_mm,
                    mask_path=row.mask,
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
                if self._wants_deletion(pred.logits, prepared.x):
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

    def _reference_grid(self, ref: Study, study: Study) -> tuple[np.ndarray, tuple[float, float, float]]:
        """The reference mask's affine in the preprocessing frame and its voxel size: placed by its own
        geometry, except a PNG mask of a 2D image of its size, which has no geometry of its own and lies on
        the image's pixels, with their spacing (:func:`medhybrid.data.transforms.png_mask_on_image`, as in
        training)."""
        dims = self.p.data_cfg.spatial_dims
        placed = png_mask_on_image(ref, study) if dims == 2 else ref
        return frame_affine(placed.affine, dims), placed.spacing

    def _wants_deletion(self, logits: np.ndarray | None, x: torch.Tensor) -> bool:
        """Deletion curves for studies called abnormal (the maps explain abnormality), up to the cap, for a
        classifier whose input is one window (the curve re-scores that one input)."""
        if not self.p.classifies or not self.p.one_window(x):
            return False
        if logits is None or self.faithful_done >= self.o.max_faithfulness:
            return False
        p = float(abnormality(torch.softmax(torch.as_tensor(logits) / self.temperature, 0).numpy()[None])[0])
        return p >= (self.model_threshold if self.model_threshold is not None else self.p.threshold)


def _scored(records: Sequence[StudyRecord], grouped: bool) -> Scored:
    return Scored(
        labels=np.asarray([r.label for r in records], dtype=int),
        scores=np.asarray([r.score for r in records], dtype=np.float64),
        logits=stack_logits([r.logits for r in records]),
        groups=np.asarray([r.group for r in records]) if grouped else None,
    )


def stored_calibration(predictor: Predictor) -> Fitted:
    """What the model carries: the sidecar's temperature and operating point when there is one, else
    training's operating point on raw scores (an ensemble without a sidecar: the default threshold)."""
    cal = predictor.calibration
    if cal.get("operating_point"):
        return Fitted(float(cal.get("temperature", 1.0)), dict(cal["operating_point"]))
    return Fitted(1.0, dict(predictor.operating_point))


def _splits(predictor: Predictor, manifest: Path, o: EvaluateOptions) -> dict[str, Any]:
    """Which split each figure comes from, and whether the evaluated one trained or chose the model."""
    digest = sha256_file(manifest)
    if predictor.ensemble is not None:  # the folds of a cross-validation run pool these splits
        same_manifest = predictor.ensemble.get("manifest_sha256") == digest
        pooled = list(predictor.ensemble.get("pooled_splits") or [])
        training, selection = pooled, pooled
    else:
        same_manifest = predictor.members[0].ckpt.get("manifest_sha256") == digest
        training, selection = [predictor.data_cfg.train_split], [predictor.data_cfg.val_split]
    unknown = "unknown (the model was trained on another manifest)"
    out: dict[str, Any] = {
        "evaluated": o.split,
        "calibration": o.calibration_split,
        "selection": selection if same_manifest else unknown,
        "training": training if same_manifest else unknown,
    }
    if same_manifest and o.split in training + selection:
        role = "trained the model" if o.split in training else "selected the model's epoch"
        out["warning"] = f"split {o.split!r} {role}: these figures are optimistic, not an estimate of accuracy"
    # a temperature and threshold fitted on studies the model trained on would be overconfident: not stored
    out["calibration_on_training_data"] = bool(same_manifest and o.calibration_split in training)
    return out


def evaluate(
    model: Path,
    manifest: Path,
    out: Path,
    options: EvaluateOptions | None = None,
    *,
    on_study: Callable[[StudyRecord], None] | None = None,
) -> EvaluateResult:
    """Evaluate ``model`` (run folder, checkpoint or cross-validation ensemble) on ``options.split`` of
    ``manifest`` into ``out``.

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
    if (out / METRICS_FILE).is_file():  # from an earlier run: this folder is unfinished until the new one lands
        logger.info("%s: replacing the previous evaluation", out)
        (out / METRICS_FILE).unlink()
    n_seg = int(predictor.model.seg_classes or 0)
    ev = _Evaluator(predictor, o, out, n_seg)
    rule = parse_operating_point(o.operating_point, predictor.eval_cfg.operating_point)
    scores_study = predictor.score_method is not None
    splits = _splits(predictor, mf.path, o)
    stored = stored_calibration(predictor)
    ev.temperature, ev.model_threshold = stored.temperature, stored.operating_point["threshold"]
    # a temperature and threshold fitted on studies the model trained on would flatter it: not refitted
    refit = not splits["calibration_on_training_data"]
    stored_note = "" if refit else f"split {o.calibration_split!r} trained the model, so nothing was fitted on it"

    calibration: list[StudyRecord] | None = None
    if scores_study and refit and o.calibration_split != o.split:
        cal_rows = mf.split(o.calibration_split)[: o.limit]
        if cal_rows:
            logger.info("calibration: %d studies of split %s", len(cal_rows), o.calibration_split)
            calibration = [ev.study(r, explain=False) for r in cal_rows]
            for rec in calibration:
                if on_study:
                    on_study(rec)
            calibration = [r for r in calibration if r.status == "ok" and r.label is not None]
            if calibration:
                early = fit(_scored(calibration, False), rule, stored)  # for the deletion curves' selection
                ev.temperature, ev.model_threshold = early.temperature, early.operating_point["threshold"]
            else:
                calibration = None
    records: list[StudyRecord] = []
    for row in rows:
        rec = ev.study(row, explain=o.saliency)
        records.append(rec)
        if on_study:
            on_study(rec)
        fault_point("evaluate_study")
    ok = [r for r in records if r.status == "ok"]
    grouped = mf.has_patients

    result: dict[str, Any] = {
        "model": {
            "name": predictor.model_name,
            "checkpoint": str(predictor.path),
            "weights_sha256": predictor.weights_sha256,
            "task": predictor.task,
            "members": len(predictor.members),
        },
        "manifest": str(mf.path),
        "split": o.split,
        "calibration_split": o.calibration_split,
        "splits": splits,
        "n_studies": len(records),
        "n_failed": len(records) - len(ok),
        "failed": [{"study_id": r.study_id, "error": r.error} for r in records if r.status != "ok"],
        "bootstrap": {
            "n_boot": o.n_boot,
            "seed": o.seed,
            "level": 0.95,
            "method": "BCa (scipy.stats.bootstrap)",
            "resampling": "patients (manifest patient_id)" if grouped else "studies",
        },
        "tta": o.tta,
        "medhybrid_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    score_of: dict[str, float] = {}
    thr_of: dict[str, float] = {}
    labelled = [r for r in ok if r.label is not None and r.score is not None]
    if scores_study and labelled:
        same = refit and o.calibration_split == o.split
        cal_records = labelled if same else calibration
        cal = _scored(cal_records, grouped) if cal_records else None
        result["classification"], fitted, scores, thresholds = classification_metrics(
            _scored(labelled, grouped),
            cal,
            rule,
            stored,
            same_split=same,
            n_boot=o.n_boot,
            seed=o.seed,
            label_names=predictor.label_names or {0: "normal", 1: "abnormal"},
            score_method=str(predictor.score_method),
            stored_note=stored_note or f"no labelled study in split {o.calibration_split!r}",
        )
        score_of = dict(zip((r.study_id for r in labelled), scores, strict=True))
        thr_of = dict(zip((r.study_id for r in labelled), thresholds, strict=True))
        if not refit:
            result["calibration_not_refitted"] = stored_note
        if fitted is not None and o.store_calibration and cal is not None:
            result["calibration_stored_in"] = str(_store(predictor, fitted, result, mf.path, o, cal))
    seg_records = [r for r in ok if r.seg is not None]
    if seg_records:
        result["segmentation"] = segmentation_summary(
            [r.seg for r in seg_records if r.seg is not None],
            predictor.mask_label_names,
            groups=[r.group for r in seg_records] if grouped else None,
            n_boot=o.n_boot,
            seed=o.seed,
        )
        result["segmentation"]["nsd_tolerance_mm"] = o.nsd_tolerance_mm
        result["segmentation"]["grid"] = "the reference mask's own grid (prediction resampled onto it)"
        result["segmentation"]["n_other_grid"] = sum(r.seg_resampled for r in seg_records)
    done = [r for r in ok if r.deletion]
    faith = faithfulness_summary(
        [r.deletion for r in done if r.deletion],
        groups=[r.group for r in done] if grouped else None,
        n_boot=o.n_boot,
        seed=o.seed,
    )
    if faith:
        faith["steps"] = o.deletion_steps
        faith["selection"] = "studies called abnormal at the operating point (at most --max-faithfulness)"
        result["faithfulness"] = faith
    seconds = [r.seconds for r in ok]
    result["seconds_per_study"] = float(np.median(seconds)) if seconds else None
    result["wall_seconds"] = time.perf_counter() - t_start

    atomic_write_bytes(out / PREDICTIONS_FILE, predictions_csv(records, predictor, score_of, thr_of))
    if o.report:
        from medhybrid.evaluate.html import evaluation_html

        atomic_write_bytes(out / REPORT_FILE, evaluation_html(result))
    fault_point("evaluate_outputs")
    write_json(out / METRICS_FILE, result)  # last: the mark of a finished evaluation (module docstring)
    return EvaluateResult(out, result, records)


def _store(
    predictor: Predictor, fitted: Fitted, result: dict[str, Any], manifest: Path, o: EvaluateOptions, cal: Scored
) -> Path:
    """The fitted temperature and operating point, into the model's calibration sidecar."""
    ece = ((result["classification"].get("calibration") or {}).get("fitted_on")) or {}
    payload = {
        "temperature": fitted.temperature,
        "operating_point": fitted.operating_point,
        "n": len(cal),
        "ece_before": ece.get("ece_before"),
        "ece_after": ece.get("ece_after"),
        "temperature_rejected": fitted.temperature_rejected,
        "fitted_on": f"{manifest.name}:{o.calibration_split}",
        "created": result["created"],
    }
    write_calibration(predictor.path, payload, predictor.weights_sha256)
    return calibration_path(predictor.path)


def predictions_csv(
    records: Sequence[StudyRecord], predictor: Predictor, score_of: dict[str, float], thr_of: dict[str, float]
) -> bytes:
    """One row per study: calibrated and raw score, threshold, decision, class probabilities (temperature
    1), Dice/HD95/NSD per class, faithfulness, saliency files, seconds, error."""
    class_names = [predictor.label_names.get(i, f"class {i}") for i in range(predictor.model.num_classes)]
    seg_names = [predictor.mask_label_names.get(c, f"class {c}") for c in range(1, predictor.model.seg_classes)]
    methods = sorted({m for r in records if r.deletion for m in r.deletion if m != "random"})
    header = ["study_id", "split", "status", "label", "probability", "probability_raw", "threshold", "decision"]
    header += [f"p_{_safe(n)}" for n in class_names]
    has_seg = any(r.seg for r in records)
    if has_seg:
        header += [f"{m}_{_safe(n)}" for n in seg_names for m in METRICS]
    header += [f"faithfulness_{m}" for m in methods] + ["saliency_files", "seconds", "error"]
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(header)

    def fmt(v: float | None) -> str:
        return "" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.6g}"

    for r in records:
        row: list[Any] = [r.study_id, r.split, r.status, "" if r.label is None else r.label]
        p, thr = score_of.get(r.study_id), thr_of.get(r.study_id)
        decision = "" if p is None or thr is None else ("abnormal" if p >= thr else "normal")
        row += [fmt(p), fmt(r.score), fmt(thr), decision]
        row += [fmt(float(v)) for v in r.class_probs] if r.class_probs is not None else [""] * len(class_names)
        if has_seg:
            for c in range(len(seg_names)):
                row += [fmt(r.seg[m][c]) if r.seg else "" for m in METRICS]
        row += [fmt(r.deletion[m]["faithfulness"]) if r.deletion and m in r.deletion else "" for m in methods]
        row += [";".join(r.saliency_files.values()), f"{r.seconds:.3f}", r.error or ""]
        writer.writerow(row)
    return buf.getvalue().encode()
