"""Study-level metrics of ``medhybrid evaluate``: AUROC and curves, the operating point, calibration.

Two kinds of numbers, kept apart on purpose:

- **Rank metrics** (AUROC with its CI, average precision, ROC and PR curves) use the **raw** scores, the
  model's own output. They do not depend on a temperature or a threshold, and computing them on
  probabilities calibrated by two different temperatures (cross-fitting, below) would reorder studies
  across the two halves and change the AUROC.
- **Numbers at the operating point** (sensitivity, specificity, PPV, NPV, F1, accuracy) and the
  calibrated ECE use the temperature and threshold fitted on the calibration split. When the evaluated
  split *is* the calibration split, they are **cross-fitted**: the studies (a patient's studies together)
  are split in two halves stratified by class, each half is scored with the temperature and threshold
  fitted on the other, and the counts are pooled.

The temperature is fitted on the logits the model produced (averaged over TTA flips and ensemble
members). A segmentation-only lesion model has no logits: its lesion score gets a threshold only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from medhybrid.config import EvalConfig
from medhybrid.evaluate import bootstrap as B
from medhybrid.evaluate import metrics as M
from medhybrid.train.evaluate import abnormality, operating_point

CURVE_POINTS = 200


@dataclass
class Scored:
    """The studies of one split, as the metrics need them.

    Attributes:
        labels: ``(N,)`` class labels (abnormal: label != 0).
        scores: ``(N,)`` raw study scores (``1 - p(normal)`` at temperature 1, or the lesion score).
        logits: ``(N, C)`` classification logits, or None (lesion-score models).
        groups: ``(N,)`` sampling units (patients where the manifest names them), or None.
    """

    labels: np.ndarray
    scores: np.ndarray
    logits: np.ndarray | None
    groups: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, mask: np.ndarray) -> Scored:
        return Scored(
            self.labels[mask],
            self.scores[mask],
            None if self.logits is None else self.logits[mask],
            None if self.groups is None else self.groups[mask],
        )


@dataclass
class Fitted:
    """A temperature (1 without logits) and the operating point chosen on the scores it calibrates."""

    temperature: float
    operating_point: dict[str, Any]
    temperature_rejected: str | None = None  # why a fitted temperature was not kept (it worsened ECE)

    def calibrated(self, s: Scored) -> tuple[np.ndarray | None, np.ndarray]:
        """Calibrated class probabilities ``(N, C)`` (None without logits) and calibrated scores ``(N,)``."""
        if s.logits is None:
            return None, s.scores
        probs = M.softmax_t(s.logits, self.temperature)
        return probs, abnormality(probs)


def fit(s: Scored, rule: Any, fallback: Fitted) -> Fitted:
    """Temperature (negative log-likelihood of the logits) then the operating point on the calibrated scores.

    Studies of one class only (a segmentation-only lesion model on data where every study has a lesion, a
    cross-fit half without normals) fix neither: a temperature fitted on them only learns to push every
    probability to that class, and no threshold separates classes that are not both there. ``fallback``
    (the calibration stored with the model) is returned instead, its ``operating_point`` saying why."""
    abnormal = s.labels != 0
    if not abnormal.any() or abnormal.all():
        reason = f"the {len(s)} fitting studies are all {'abnormal' if abnormal.any() else 'normal'}"
        return Fitted(fallback.temperature, {**fallback.operating_point, "not_refitted": reason})
    temperature = M.fit_temperature(s.logits, s.labels) if s.logits is not None else 1.0
    rejected = None
    if s.logits is not None and temperature != 1.0:
        # NLL and ECE can disagree (few studies, a few confident errors): a temperature that makes the
        # fitting split's ECE worse would be stored as "calibration" while making it worse; kept at 1 instead
        before = M.calibration_bins(s.labels, M.softmax_t(s.logits, 1.0))["ece"]
        after = M.calibration_bins(s.labels, M.softmax_t(s.logits, temperature))["ece"]
        if after > before:
            rejected = (
                f"the fitted temperature {temperature:.3g} raised the calibration split's ECE from {before:.3f} "
                f"to {after:.3f}: not applied (temperature 1)"
            )
            temperature = 1.0
    _, scores = Fitted(temperature, {}).calibrated(s)
    return Fitted(temperature, operating_point(abnormal, scores, EvalConfig(operating_point=rule)), rejected)


def halves(s: Scored, seed: int) -> np.ndarray:
    """Two halves stratified by class, a sampling unit (patient) never split: ``(N,)`` of 0/1."""
    units = s.groups if s.groups is not None else np.arange(len(s)).astype(str)
    names, inverse = np.unique(units, return_inverse=True)
    unit_abnormal = np.zeros(len(names), dtype=bool)
    np.logical_or.at(unit_abnormal, inverse, s.labels != 0)
    rng = np.random.default_rng(seed)
    half = np.zeros(len(names), dtype=int)
    for cls in (False, True):
        idx = np.flatnonzero(unit_abnormal == cls)
        rng.shuffle(idx)
        half[idx[1::2]] = 1
    return half[inverse]


def crossfit(
    s: Scored, rule: Any, seed: int, fallback: Fitted
) -> tuple[np.ndarray | None, np.ndarray, np.ndarray, list[dict]]:
    """Each half scored with what was fitted on the other: calibrated probabilities ``(N, C)`` (or None),
    calibrated scores ``(N,)``, thresholds ``(N,)`` and a summary per fold."""
    fold = halves(s, seed)
    probs = np.zeros_like(s.logits) if s.logits is not None else None
    scores, thresholds = np.zeros(len(s)), np.zeros(len(s))
    folds = []
    for k in (0, 1):
        test = fold == k
        fitted = fit(s.take(~test), rule, fallback)
        p, sc = fitted.calibrated(s.take(test))
        if probs is not None and p is not None:
            probs[test] = p
        scores[test] = sc
        thresholds[test] = fitted.operating_point["threshold"]
        summary = {"temperature": fitted.temperature, "threshold": fitted.operating_point["threshold"]}
        if "not_refitted" in fitted.operating_point:
            summary["not_refitted"] = fitted.operating_point["not_refitted"]
        if fitted.temperature_rejected:
            summary["temperature_rejected"] = fitted.temperature_rejected
        folds.append({**summary, "n_fit": int((~test).sum())})
    return probs, scores, thresholds, folds


def _curve(x: np.ndarray, y: np.ndarray, t: np.ndarray | None = None) -> dict[str, list[float]]:
    """Curve points, thinned evenly to at most ``CURVE_POINTS`` (for plots; metrics use all points)."""
    idx = np.unique(np.linspace(0, len(x) - 1, min(len(x), CURVE_POINTS)).round().astype(int))
    out = {"x": [float(v) for v in x[idx]], "y": [float(v) for v in y[idx]]}
    if t is not None:
        out["threshold"] = [float(min(v, 1.0)) for v in t[idx]]
    return out


def rank_metrics(s: Scored, *, n_boot: int, seed: int) -> dict[str, Any]:
    """AUROC with its CI (clustered by patient where known), average precision, ROC and PR curves, all on
    the raw scores."""
    from sklearn.metrics import average_precision_score, precision_recall_curve, roc_curve

    abnormal = s.labels != 0
    out: dict[str, Any] = {"auroc": B.auroc_ci(abnormal, s.scores, groups=s.groups, n_boot=n_boot, seed=seed)}
    if abnormal.any() and (~abnormal).any():
        fpr, tpr, thr = roc_curve(abnormal, s.scores)
        prec, rec, _ = precision_recall_curve(abnormal, s.scores)
        out["roc_curve"] = _curve(fpr, tpr, thr)
        out["pr_curve"] = _curve(rec[::-1], prec[::-1])
        out["average_precision"] = float(average_precision_score(abnormal, s.scores))
    return out


def classification_metrics(
    s: Scored,
    calibration: Scored | None,
    rule: Any,
    stored: Fitted,
    *,
    same_split: bool,
    n_boot: int,
    seed: int,
    label_names: dict[int, str],
    score_method: str,
    stored_note: str = "",
) -> tuple[dict[str, Any], Fitted | None, np.ndarray, np.ndarray]:
    """Metrics of the evaluated studies, what was fitted on the calibration split (to store; None without
    one), and per study the calibrated score and the threshold it was called at.

    ``calibration`` None: the calibration stored with the model (``stored``: the sidecar's temperature and
    threshold, or training's threshold on raw scores) is applied as it is, ``stored_note`` saying why;
    ``same_split``: the calibration studies are the evaluated ones (cross-fitted, module docstring). A
    calibration set of one class falls back to ``stored`` (:func:`fit`)."""
    out: dict[str, Any] = {
        "n": len(s),
        "label_names": {str(k): v for k, v in label_names.items()},
        "score": score_method,
        "rank_metrics_on": "raw scores (no temperature, no threshold)",
        **rank_metrics(s, n_boot=n_boot, seed=seed),
    }
    fitted: Fitted | None = None
    if calibration is None:
        probs, scores = stored.calibrated(s)
        thresholds = np.full(len(s), float(stored.operating_point["threshold"]))
        out["protocol"] = "no calibration refitted: the temperature and threshold stored with the model" + (
            f" ({stored_note})" if stored_note else ""
        )
        out["temperature"] = stored.temperature
        out["operating_point"] = stored.operating_point
    else:
        fitted = fit(calibration, rule, stored)
        out["temperature"] = fitted.temperature
        if fitted.temperature_rejected:
            out["temperature_rejected"] = fitted.temperature_rejected
        out["operating_point"] = fitted.operating_point
        if same_split:
            probs, scores, thresholds, out["folds"] = crossfit(s, rule, seed, stored)
            out["protocol"] = (
                "cross-fitted: the evaluated split is the calibration split, so each stratified half is scored "
                "with the temperature and threshold fitted on the other half"
            )
        else:
            probs, scores = fitted.calibrated(s)
            thresholds = np.full(len(s), fitted.operating_point["threshold"])
            out["protocol"] = "temperature and threshold fitted on the calibration split"
        if "not_refitted" in fitted.operating_point:
            out["protocol"] += f"; not refitted ({fitted.operating_point['not_refitted']}): the stored ones used"
            fitted = None  # nothing new to store
    abnormal = s.labels != 0
    at_op = M.binary_metrics(abnormal, (scores >= thresholds).astype(float), 0.5)
    at_op["threshold"] = float(np.mean(thresholds))
    out["at_operating_point"] = at_op
    if s.logits is not None and probs is not None:
        out["accuracy_argmax"] = float((probs.argmax(1) == s.labels).mean())
        out["calibration"] = {
            "before": M.calibration_bins(s.labels, M.softmax_t(s.logits, 1.0)),
            "after": M.calibration_bins(s.labels, probs),
        }
        cal_probs = fitted.calibrated(calibration)[0] if calibration is not None and fitted is not None else None
        if calibration is not None and calibration.logits is not None and cal_probs is not None:
            out["calibration"]["fitted_on"] = {
                "ece_before": M.calibration_bins(calibration.labels, M.softmax_t(calibration.logits, 1.0))["ece"],
                "ece_after": M.calibration_bins(calibration.labels, cal_probs)["ece"],
            }
    return out, fitted, scores, thresholds


def stack_logits(rows: Sequence[np.ndarray | None]) -> np.ndarray | None:
    """``(N, C)`` float64 logits, or None when any row has none."""
    if not rows or any(r is None for r in rows):
        return None
    return np.asarray(rows, dtype=np.float64)
