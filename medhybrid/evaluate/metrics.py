"""Metrics at an operating point, expected calibration error and temperature scaling (scikit-learn and
scipy underneath). Confidence intervals live in :mod:`medhybrid.evaluate.bootstrap`."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax

from medhybrid.evaluate.bootstrap import binary_labels


def binary_metrics(labels: np.ndarray, scores: np.ndarray, threshold: float) -> dict[str, Any]:
    """Counts and rates when a case is called abnormal at ``score >= threshold`` (scikit-learn's
    confusion matrix). A rate whose denominator is 0 is NaN."""
    from sklearn.metrics import confusion_matrix

    y = binary_labels(labels)
    called = np.asarray(scores, dtype=np.float64) >= threshold
    tn, fp, fn, tp = (int(v) for v in confusion_matrix(y, called, labels=[False, True]).ravel())

    def ratio(a: int, b: int) -> float:
        return a / b if b else math.nan

    sens, ppv = ratio(tp, tp + fn), ratio(tp, tp + fp)
    return {
        "threshold": float(threshold),
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
        "sensitivity": sens,
        "specificity": ratio(tn, tn + fp),
        "ppv": ppv,
        "npv": ratio(tn, tn + fn),
        "f1": ratio(2 * tp, 2 * tp + fp + fn),
        "accuracy": ratio(tp + tn, len(y)),
    }


def calibration_bins(labels: np.ndarray, probs: np.ndarray, n_bins: int = 15) -> dict[str, Any]:
    """Top-label reliability: cases binned by confidence (the largest class probability) into equal-width
    bins; per bin the mean confidence, the accuracy and the count. ``ece`` is the count-weighted mean
    gap |accuracy - confidence| (Guo et al., 2017).

    Args:
        probs: ``(N, C)`` class probabilities, or ``(N,)`` probability of class 1 (binary).
    """
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim == 1:
        p = np.stack([1.0 - p, p], axis=1)
    y = np.asarray(labels).astype(int)
    confidence = p.max(axis=1)
    correct = p.argmax(axis=1) == y
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, n_bins - 1)
    count = np.bincount(which, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        conf = np.bincount(which, weights=confidence, minlength=n_bins) / count
        acc = np.bincount(which, weights=correct.astype(float), minlength=n_bins) / count
    gaps = np.where(count > 0, np.abs(acc - conf), 0.0)
    return {
        "ece": float((gaps * count).sum() / max(len(y), 1)),
        "edges": edges.tolist(),
        "confidence": [None if c == 0 else float(v) for v, c in zip(conf, count, strict=True)],
        "accuracy": [None if c == 0 else float(v) for v, c in zip(acc, count, strict=True)],
        "count": count.tolist(),
    }


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The temperature ``T`` minimising the negative log-likelihood of ``softmax(logits / T)`` (Guo et
    al., 2017), searched over ``log T`` in [-4, 4] with scipy's bounded Brent method. It rescales
    confidence without changing any study's predicted class; with two classes it keeps the studies' order
    too, with more it may reorder ``1 - p(normal)`` between studies (which is why rank metrics use the raw
    scores)."""
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels).astype(int)

    def nll(log_t: float) -> float:
        return float(-log_softmax(z / math.exp(log_t), axis=1)[np.arange(len(y)), y].mean())

    result = minimize_scalar(nll, bounds=(-4.0, 4.0), method="bounded", options={"xatol": 1e-4})
    return float(math.exp(result.x))


def softmax_t(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Class probabilities of ``logits / temperature``."""
    return np.asarray(np.exp(log_softmax(np.asarray(logits, dtype=np.float64) / temperature, axis=1)))


# --- paired differences between two models ---------------------------------------------------------
