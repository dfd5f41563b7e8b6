"""Evaluation metrics with uncertainty: AUROC with a stratified bootstrap CI, metrics at an operating
point, bootstrap CIs of means, expected calibration error, and temperature scaling.

Point estimates come from scikit-learn. The bootstrap replicates of AUROC are computed here, vectorised
over all replicates at once with the Mann-Whitney statistic (average ranks for ties, which is exactly
scikit-learn's ROC AUC): calling ``roc_auc_score`` 2000 times per CI is 100x slower, and no well-kept
library offers a stratified, seedable bootstrap of AUROC.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax
from scipy.stats import rankdata

DEFAULT_BOOTSTRAP = 2000


def _binary(labels: np.ndarray) -> np.ndarray:
    y = np.asarray(labels)
    if y.ndim != 1:
        raise ValueError(f"labels must be 1D, got shape {y.shape}")
    return y.astype(bool)


def auroc_replicates(positive: np.ndarray, negative: np.ndarray) -> np.ndarray:
    """AUROC of each row: ``positive`` ``(R, P)`` and ``negative`` ``(R, N)`` scores (Mann-Whitney U / PN)."""
    both = np.concatenate([positive, negative], axis=1)
    ranks = rankdata(both, axis=1)  # average ranks for ties
    p = positive.shape[1]
    u = ranks[:, :p].sum(axis=1) - p * (p + 1) / 2.0
    return np.asarray(u / (p * negative.shape[1]), dtype=np.float64)


def auroc_ci(
    labels: np.ndarray, scores: np.ndarray, *, n_boot: int = DEFAULT_BOOTSTRAP, seed: int = 0, level: float = 0.95
) -> dict[str, Any]:
    """AUROC (scikit-learn) and a stratified percentile bootstrap CI.

    Stratified: each replicate resamples the abnormal and the normal cases separately, with replacement,
    keeping both counts, so every replicate has both classes.

    Returns:
        ``value``, ``ci_low``, ``ci_high``, ``level``, ``n_boot``, ``seed``, ``n_pos``, ``n_neg``; NaN values
        when a class is absent.
    """
    from sklearn.metrics import roc_auc_score

    y = _binary(labels)
    s = np.asarray(scores, dtype=np.float64)
    pos, neg = s[y], s[~y]
    out: dict[str, Any] = {"level": level, "n_boot": n_boot, "seed": seed, "n_pos": len(pos), "n_neg": len(neg)}
    if not len(pos) or not len(neg):
        return {**out, "value": math.nan, "ci_low": math.nan, "ci_high": math.nan}
    rng = np.random.default_rng(seed)
    reps = auroc_replicates(
        pos[rng.integers(0, len(pos), size=(n_boot, len(pos)))],
        neg[rng.integers(0, len(neg), size=(n_boot, len(neg)))],
    )
    lo, hi = np.quantile(reps, [(1 - level) / 2, (1 + level) / 2])
    return {**out, "value": float(roc_auc_score(y, s)), "ci_low": float(lo), "ci_high": float(hi)}


def mean_ci(
    values: np.ndarray, *, n_boot: int = DEFAULT_BOOTSTRAP, seed: int = 0, level: float = 0.95
) -> dict[str, Any]:
    """Mean of the finite values and its percentile bootstrap CI (NaN entries, e.g. Dice of an empty
    reference, are left out and counted)."""
    v = np.asarray(values, dtype=np.float64)
    finite = v[np.isfinite(v)]
    out: dict[str, Any] = {"n": len(finite), "n_excluded": int(len(v) - len(finite)), "level": level}
    if not len(finite):
        return {**out, "value": math.nan, "ci_low": math.nan, "ci_high": math.nan}
    rng = np.random.default_rng(seed)
    means = finite[rng.integers(0, len(finite), size=(n_boot, len(finite)))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return {**out, "value": float(finite.mean()), "ci_low": float(lo), "ci_high": float(hi)}


def binary_metrics(labels: np.ndarray, scores: np.ndarray, threshold: float) -> dict[str, Any]:
    """Counts and rates when a case is called abnormal at ``score >= threshold`` (scikit-learn's
    confusion matrix). A rate whose denominator is 0 is NaN."""
    from sklearn.metrics import confusion_matrix

    y = _binary(labels)
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
    confidence without changing any prediction's rank or class."""
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels).astype(int)

    def nll(log_t: float) -> float:
        return float(-log_softmax(z / math.exp(log_t), axis=1)[np.arange(len(y)), y].mean())

    result = minimize_scalar(nll, bounds=(-4.0, 4.0), method="bounded", options={"xatol": 1e-4})
    return float(math.exp(result.x))


def softmax_t(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Class probabilities of ``logits / temperature``."""
    return np.asarray(np.exp(log_softmax(np.asarray(logits, dtype=np.float64) / temperature, axis=1)))


def _delta_summary(reps: np.ndarray, value: float, level: float, n_boot: int, seed: int) -> dict[str, Any]:
    lo, hi = np.nanquantile(reps, [(1 - level) / 2, (1 + level) / 2])
    return {
        "value": value,
        "ci_low": float(lo),
        "ci_high": float(hi),
        "p_le_0": float(np.mean(reps <= 0)),  # share of replicates where A is not better than B
        "level": level,
        "n_boot": n_boot,
        "seed": seed,
    }


def paired_auroc_delta(
    labels: np.ndarray,
    a: np.ndarray,
    b: np.ndarray,
    *,
    n_boot: int = DEFAULT_BOOTSTRAP,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, Any]:
    """AUROC(A) - AUROC(B) on the same studies, averaged over training seeds, with a paired stratified
    bootstrap CI: each replicate resamples the studies once and scores every model and seed on it.

    Args:
        a, b: ``(seeds, N)`` scores of the two models (rows: seeds; columns: the same studies in order).
    """
    y = _binary(labels)
    a2, b2 = np.atleast_2d(np.asarray(a, dtype=np.float64)), np.atleast_2d(np.asarray(b, dtype=np.float64))
    pos, neg = np.flatnonzero(y), np.flatnonzero(~y)
    rng = np.random.default_rng(seed)
    ip = rng.integers(0, len(pos), size=(n_boot, len(pos)))
    ineg = rng.integers(0, len(neg), size=(n_boot, len(neg)))

    def mean_auc(scores: np.ndarray) -> tuple[float, np.ndarray]:
        point = np.mean([auroc_replicates(s[pos][None], s[neg][None])[0] for s in scores])
        reps = np.mean([auroc_replicates(s[pos][ip], s[neg][ineg]) for s in scores], axis=0)
        return float(point), reps

    pa, ra = mean_auc(a2)
    pb, rb = mean_auc(b2)
    return _delta_summary(ra - rb, pa - pb, level, n_boot, seed)


def paired_mean_delta(
    a: np.ndarray, b: np.ndarray, *, n_boot: int = DEFAULT_BOOTSTRAP, seed: int = 0, level: float = 0.95
) -> dict[str, Any]:
    """Mean(A) - mean(B) of per-study values (e.g. Dice) on the same studies, averaged over seeds, with a
    paired bootstrap CI over studies. ``a``, ``b``: ``(seeds, N)``; studies NaN in either are left out."""
    a2, b2 = np.atleast_2d(np.asarray(a, dtype=np.float64)), np.atleast_2d(np.asarray(b, dtype=np.float64))
    keep = np.all(np.isfinite(a2), axis=0) & np.all(np.isfinite(b2), axis=0)
    d = a2[:, keep].mean(0) - b2[:, keep].mean(0)  # per-study difference of the seed means
    rng = np.random.default_rng(seed)
    reps = d[rng.integers(0, len(d), size=(n_boot, len(d)))].mean(1) if len(d) else np.full(n_boot, math.nan)
    return {**_delta_summary(reps, float(d.mean()) if len(d) else math.nan, level, n_boot, seed), "n": int(len(d))}
