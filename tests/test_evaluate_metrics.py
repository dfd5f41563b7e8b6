"""Evaluation metrics: hand-computed cases, agreement with scikit-learn, CI coverage, calibration."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import norm
from sklearn.metrics import roc_auc_score

from medhybrid.evaluate.metrics import (
    auroc_ci,
    auroc_replicates,
    binary_metrics,
    calibration_bins,
    fit_temperature,
    mean_ci,
    softmax_t,
)


def test_binary_metrics_by_hand() -> None:
    labels = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0])
    scores = np.array([0.9, 0.8, 0.4, 0.3, 0.7, 0.2, 0.1, 0.1, 0.0, 0.5])
    m = binary_metrics(labels, scores, 0.5)  # called: 0.9, 0.8 (TP), 0.7, 0.5 (FP)
    assert (m["tp"], m["fp"], m["tn"], m["fn"]) == (2, 2, 4, 2)
    assert m["sensitivity"] == 0.5 and m["specificity"] == 4 / 6 and m["ppv"] == 0.5 and m["npv"] == 4 / 6
    assert m["f1"] == pytest.approx(0.5) and m["accuracy"] == 0.6
    none_called = binary_metrics(labels, scores, 1.5)
    assert math.isnan(none_called["ppv"]) and none_called["specificity"] == 1.0


def test_auroc_replicates_equal_sklearn_with_ties() -> None:
    rng = np.random.default_rng(0)
    for _ in range(20):
        pos = rng.integers(0, 5, size=(1, 13)).astype(float)  # many ties
        neg = rng.integers(0, 4, size=(1, 17)).astype(float)
        y = np.r_[np.ones(13), np.zeros(17)]
        expected = roc_auc_score(y, np.r_[pos[0], neg[0]])
        assert auroc_replicates(pos, neg)[0] == pytest.approx(expected)


def test_auroc_ci_is_seeded_and_brackets_the_estimate() -> None:
    rng = np.random.default_rng(1)
    labels = np.r_[np.ones(40), np.zeros(60)]
    scores = np.r_[rng.normal(1, 1, 40), rng.normal(0, 1, 60)]
    a = auroc_ci(labels, scores, n_boot=500, seed=3)
    assert a == auroc_ci(labels, scores, n_boot=500, seed=3)
    assert a["value"] == pytest.approx(roc_auc_score(labels, scores))
    assert a["ci_low"] < a["value"] < a["ci_high"] and a["ci_high"] - a["ci_low"] < 0.3
    assert math.isnan(auroc_ci(np.ones(5), np.arange(5.0))["value"])


def test_bootstrap_ci_covers_the_true_auroc_about_95_percent() -> None:
    # two unit normals d apart: true AUROC = Phi(d / sqrt(2))
    d = 1.0
    truth = norm.cdf(d / math.sqrt(2))
    rng = np.random.default_rng(2024)
    sims, hits = 200, 0
    for s in range(sims):
        labels = np.r_[np.ones(60), np.zeros(90)]
        scores = np.r_[rng.normal(d, 1, 60), rng.normal(0, 1, 90)]
        ci = auroc_ci(labels, scores, n_boot=400, seed=s)
        hits += ci["ci_low"] <= truth <= ci["ci_high"]
    coverage = hits / sims
    # 200 simulations: the binomial SE at 0.95 is 0.015; percentile bootstraps run slightly narrow
    assert 0.88 <= coverage <= 0.99, coverage


def test_mean_ci_leaves_out_nan_and_counts_it() -> None:
    values = np.array([0.8, 0.9, np.nan, 0.7, 0.85])
    m = mean_ci(values, n_boot=300, seed=0)
    assert m["value"] == pytest.approx(0.8125) and m["n"] == 4 and m["n_excluded"] == 1
    assert m["ci_low"] <= m["value"] <= m["ci_high"]


def test_ece_by_hand() -> None:
    # binary probabilities of class 1; confidences 0.9 (2 cases, 1 correct) and 0.6 (2 cases, both correct)
    labels = np.array([1, 0, 1, 1])
    probs = np.array([0.9, 0.9, 0.6, 0.6])
    cal = calibration_bins(labels, probs, n_bins=10)
    # |0.5 - 0.9| * 2/4 + |1.0 - 0.6| * 2/4 = 0.4
    assert cal["ece"] == pytest.approx(0.4) and sum(cal["count"]) == 4


def test_temperature_scaling_lowers_ece_of_an_overconfident_model() -> None:
    rng = np.random.default_rng(7)

    def sample(n: int) -> tuple[np.ndarray, np.ndarray]:
        # a calibrated 2-class model: p(y=1 | z) = sigmoid(z); then made over-confident by x4 logits
        z = rng.normal(0, 1.5, n)
        y = (rng.random(n) < 1 / (1 + np.exp(-z))).astype(int)
        return np.stack([np.zeros(n), 4.0 * z], axis=1), y

    val_logits, val_y = sample(2000)
    test_logits, test_y = sample(2000)
    t = fit_temperature(val_logits, val_y)
    assert t == pytest.approx(4.0, rel=0.2)
    before = calibration_bins(test_y, softmax_t(test_logits))["ece"]
    after = calibration_bins(test_y, softmax_t(test_logits, t))["ece"]
    assert after < before / 2, (before, after)
    # ranks (and so AUROC) do not change
    assert roc_auc_score(test_y, softmax_t(test_logits, t)[:, 1]) == pytest.approx(
        roc_auc_score(test_y, softmax_t(test_logits)[:, 1])
    )
