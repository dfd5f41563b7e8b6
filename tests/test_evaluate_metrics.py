"""Evaluation metrics: hand-computed cases, agreement with scikit-learn, BCa CI coverage (stratified and
patient-clustered), the degenerate fallbacks, paired differences, calibration."""

from __future__ import annotations

import math
import warnings
from fractions import Fraction

import numpy as np
import pytest
from scipy.stats import norm
from sklearn.metrics import roc_auc_score

from medhybrid.evaluate.bootstrap import (
    _auroc_codes,
    _dense_ranks,
    _draw_counts,
    _WeightedAUROC,
    auroc_ci,
    auroc_replicates,
    mean_ci,
    paired_auroc_delta,
    paired_mean_delta,
    weighted_auroc_replicates,
)
from medhybrid.evaluate.metrics import binary_metrics, calibration_bins, fit_temperature, softmax_t

CI_KEYS = {"value", "ci_low", "ci_high", "level", "n_boot", "seed", "method", "resampling"}


def _exact_auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Mann-Whitney AUROC as an exact fraction, rounded once to the nearest float."""
    pos, neg = scores[labels.astype(bool)], scores[~labels.astype(bool)]
    twice = 2 * int((pos[:, None] > neg[None]).sum()) + int((pos[:, None] == neg[None]).sum())
    return float(Fraction(twice, 2 * len(pos) * len(neg)))


def _clustered_data(
    rng: np.random.Generator, n_patients: int, d: float, between: float, within: float, max_studies: int = 4
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Patients with 1..max_studies studies each; the label is the patient's; a study's score is
    ``d * label + patient effect (sd between) + noise (sd within)``, so a patient's studies are correlated
    (intra-class correlation between^2 / (between^2 + within^2))."""
    sick = rng.random(n_patients) < 0.4
    patient = np.repeat(np.arange(n_patients), rng.integers(1, max_studies + 1, n_patients))
    scores = d * sick[patient] + rng.normal(0, between, n_patients)[patient] + rng.normal(0, within, len(patient))
    return sick[patient], scores, patient


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


def test_bootstrap_statistic_on_dense_ranks_equals_rank_auroc() -> None:
    # the stratified statistic scipy calls: batched, on the scores' dense ranks, with ties
    rng = np.random.default_rng(3)
    scores = rng.integers(0, 6, 50).astype(float)
    y = np.arange(50) < 20
    codes, k = _dense_ranks(scores)
    ip, ineg = rng.integers(0, 20, (64, 20)), rng.integers(0, 30, (64, 30))
    expected = auroc_replicates(scores[y][ip], scores[~y][ineg])
    np.testing.assert_allclose(_auroc_codes(codes[y][ip], codes[~y][ineg], k), expected, rtol=0, atol=1e-15)
    # one side fixed (as in scipy's jackknife, which broadcasts the sample it does not leave one out of)
    fixed = np.broadcast_to(codes[~y], (64, 30))
    expected = auroc_replicates(scores[y][ip], np.broadcast_to(scores[~y], (64, 30)))
    np.testing.assert_allclose(_auroc_codes(codes[y][ip], fixed, k), expected, rtol=0, atol=1e-15)
    assert _auroc_codes(codes[y], codes[~y], k) == _exact_auroc(y, scores)


def test_weighted_auroc_with_unit_weights_is_sklearns_auroc_with_ties() -> None:
    rng = np.random.default_rng(0)
    for trial in range(60):
        n = int(rng.integers(4, 120))
        y = np.r_[True, False, rng.random(n - 2) < 0.4]
        # even trials: a few distinct values (many ties); odd: continuous scores
        scores = rng.integers(0, 5, n).astype(float) if trial % 2 == 0 else rng.normal(size=n)
        got = weighted_auroc_replicates(y, scores, np.ones(n, dtype=np.int64))[0]
        # the exact Mann-Whitney fraction, correctly rounded; scikit-learn's trapezoidal area agrees to
        # rounding (it can be 1 ulp off the correctly rounded value)
        assert got == _exact_auroc(y, scores)
        assert got == pytest.approx(roc_auc_score(y, scores), rel=0, abs=1e-15)
        # integer weights are repetitions: weight 2 on a study is that study twice
        w = rng.integers(1, 4, n)
        twice = weighted_auroc_replicates(y, scores, w)[0]
        assert twice == pytest.approx(roc_auc_score(np.repeat(y, w), np.repeat(scores, w)), rel=0, abs=1e-15)
    # a replicate without one class is NaN
    y, s = np.array([1, 1, 0, 0]), np.array([0.9, 0.2, 0.3, 0.1])
    assert math.isnan(weighted_auroc_replicates(y, s, np.array([1, 1, 0, 0]))[0])


def test_clustered_statistic_on_jackknife_samples_leaves_one_patient_out() -> None:
    # scipy's BCa jackknife calls the statistic on (n_patients, n_patients - 1) index samples
    rng = np.random.default_rng(5)
    y, scores, patient = _clustered_data(rng, 12, 1.0, 1.0, 0.5)
    scores = np.round(scores, 1)  # ties
    n_patients = 12
    leave_out = np.array([np.delete(np.arange(n_patients), i) for i in range(n_patients)])
    counts, lead = _draw_counts(leave_out, n_patients)
    got = _WeightedAUROC(scores, y, patient)(counts)
    assert lead == (n_patients,) and got.shape == (n_patients,)
    for i in range(n_patients):
        kept = patient != i
        if y[kept].all() or not y[kept].any():
            assert math.isnan(got[i])
        else:
            assert got[i] == pytest.approx(roc_auc_score(y[kept], scores[kept]), rel=0, abs=1e-15)


def test_auroc_ci_is_seeded_and_brackets_the_estimate() -> None:
    rng = np.random.default_rng(1)
    labels = np.r_[np.ones(40), np.zeros(60)]
    scores = np.r_[rng.normal(1, 1, 40), rng.normal(0, 1, 60)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an ordinary case warns about nothing
        a = auroc_ci(labels, scores, n_boot=500, seed=3)
    assert CI_KEYS | {"n_pos", "n_neg"} == set(a)
    assert a == auroc_ci(labels, scores, n_boot=500, seed=3)
    assert a != auroc_ci(labels, scores, n_boot=500, seed=4)
    assert a["value"] == roc_auc_score(labels, scores)
    assert (a["method"], a["resampling"], a["n_pos"], a["n_neg"]) == ("BCa", "stratified", 40, 60)
    assert a["ci_low"] < a["value"] < a["ci_high"] and a["ci_high"] - a["ci_low"] < 0.3
    # one study per patient is the stratified bootstrap
    assert auroc_ci(labels, scores, groups=[f"p{i}" for i in range(100)], n_boot=500, seed=3) == a
    absent = auroc_ci(np.ones(5), np.arange(5.0))
    assert math.isnan(absent["value"]) and math.isnan(absent["ci_low"]) and absent["method"] == "none"
    # patient-clustered, seeded
    y, s, patient = _clustered_data(np.random.default_rng(2), 50, 1.0, 1.0, 0.5)
    c = auroc_ci(y, s, groups=patient, n_boot=500, seed=3)
    assert c == auroc_ci(y, s, groups=patient, n_boot=500, seed=3)
    assert (c["resampling"], c["n_patients"], c["method"]) == ("patient-clustered", 50, "BCa")
    assert c["value"] == roc_auc_score(y, s) and c["ci_low"] < c["value"] < c["ci_high"]


def test_bca_ci_covers_the_true_auroc_95_percent() -> None:
    # Two unit normals d = 2 apart: true AUROC = Phi(d / sqrt 2) = 0.921, near 1, where the bootstrap
    # distribution of AUROC is skewed and small samples (30 abnormal, 45 normal) make it biased.
    # 400 simulated data sets: the number covered is Binomial(400, 0.95) for an exact 95% interval, SE of
    # the coverage sqrt(0.95 * 0.05 / 400) = 0.011; the test accepts 0.95 +- 3 SE = [0.917, 0.983] (a
    # correct interval fails it with probability ~0.3%; the data are seeded, so it is deterministic).
    # Measured (1500 other data sets, n_boot 2000): BCa 0.951, the old hand-written percentile interval
    # (same resampling scheme and n_boot) 0.911; on these 400 data sets BCa 0.9375 and percentile 0.900,
    # which is below this band: the percentile interval runs too narrow here, BCa does not.
    d, n_pos, n_neg, sims = 2.0, 30, 45, 400
    truth = norm.cdf(d / math.sqrt(2))
    se = math.sqrt(0.95 * 0.05 / sims)
    rng = np.random.default_rng(2024)
    labels = np.r_[np.ones(n_pos), np.zeros(n_neg)]
    hits = 0
    for s in range(sims):
        scores = np.r_[rng.normal(d, 1, n_pos), rng.normal(0, 1, n_neg)]
        ci = auroc_ci(labels, scores, n_boot=2000, seed=s)
        assert ci["method"] == "BCa"
        hits += ci["ci_low"] <= truth <= ci["ci_high"]
    coverage = hits / sims
    assert 0.95 - 3 * se <= coverage <= 0.95 + 3 * se, coverage


def test_clustered_ci_is_wider_than_naive_for_correlated_studies() -> None:
    # 150 patients with 1-4 studies each, intra-class correlation 1 / (1 + 0.2^2) = 0.96: a patient's
    # studies carry little more information than one, the effective sample is about the patients
    rng = np.random.default_rng(11)
    y, scores, patient = _clustered_data(rng, 150, 1.5, 1.0, 0.2)
    naive = auroc_ci(y, scores, n_boot=1000, seed=0)
    clustered = auroc_ci(y, scores, groups=patient, n_boot=1000, seed=0)
    assert clustered["value"] == naive["value"]
    width = clustered["ci_high"] - clustered["ci_low"]
    assert width > 1.4 * (naive["ci_high"] - naive["ci_low"]), (clustered, naive)
    # and the same for the mean of a per-study value
    m_naive, m_clustered = mean_ci(scores, n_boot=1000), mean_ci(scores, groups=patient, n_boot=1000)
    assert m_clustered["ci_high"] - m_clustered["ci_low"] > 1.4 * (m_naive["ci_high"] - m_naive["ci_low"])


def test_clustered_ci_covers_the_true_auroc_on_clustered_data() -> None:
    # 60 patients, 1-4 studies each, labels per patient, score = 1.5 * label + patient effect N(0, 1) +
    # N(0, 0.3^2): a positive and a negative study always come from different patients, so the true
    # AUROC is Phi(1.5 / sqrt(2 * (1 + 0.09))) = 0.825 and the study-level AUROC is unbiased for it.
    # 200 data sets: SE of the coverage sqrt(0.95 * 0.05 / 200) = 0.015, band 0.95 +- 3 SE. Measured on
    # 1000 other data sets: clustered 0.946, the naive (stratified by study) interval 0.745; on these 200:
    # clustered 0.935, naive 0.71.
    sims, truth = 200, norm.cdf(1.5 / math.sqrt(2 * 1.09))
    se = math.sqrt(0.95 * 0.05 / sims)
    rng = np.random.default_rng(77)
    hits = naive_hits = 0
    for s in range(sims):
        y, scores, patient = _clustered_data(rng, 60, 1.5, 1.0, 0.3)
        ci = auroc_ci(y, scores, groups=patient, n_boot=1000, seed=s)
        hits += ci["ci_low"] <= truth <= ci["ci_high"]
        naive = auroc_ci(y, scores, n_boot=500, seed=s)
        naive_hits += naive["ci_low"] <= truth <= naive["ci_high"]
    assert 0.95 - 3 * se <= hits / sims <= 0.95 + 3 * se, hits / sims
    assert naive_hits / sims < 0.95 - 3 * se, naive_hits / sims  # resampling studies is too narrow here


def test_degenerate_bootstraps_fall_back_without_nan_or_warnings() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # scipy's DegenerateDataWarning and numpy's 0/0 are expected, hidden
        # perfect separation: every replicate is 1.0, BCa is 0/0
        perfect = auroc_ci(np.r_[np.ones(20), np.zeros(30)], np.r_[np.arange(20) + 100.0, np.arange(30.0)])
        assert (perfect["value"], perfect["ci_low"], perfect["ci_high"]) == (1.0, 1.0, 1.0)
        assert perfect["method"] == "constant"
        # one abnormal patient among 6: a third of the replicates have no abnormal study (NaN, left out);
        # BCa is undefined, the percentile interval of the others is used
        patient = np.repeat(np.arange(6), 3)
        y = patient == 0
        scores = np.random.default_rng(0).normal(size=18) + y
        few = auroc_ci(y, scores, groups=patient, n_boot=500)
        assert few["method"] == "percentile" and few["resampling"] == "patient-clustered"
        assert math.isfinite(few["ci_low"]) and few["ci_low"] <= few["value"] <= few["ci_high"] <= 1.0
        # one abnormal study: it stays fixed, the normal studies are resampled
        one = auroc_ci(np.r_[1, np.zeros(30)], np.r_[0.5, np.linspace(0, 1, 30)], n_boot=500)
        assert one["method"] == "BCa" and one["ci_low"] < one["value"] < one["ci_high"]
        # identical models: every replicate difference is exactly 0
        rng = np.random.default_rng(1)
        y2 = rng.random(100) < 0.3
        a = np.stack([y2 + rng.normal(0, 1, 100) for _ in range(3)])
        for groups in (None, np.arange(100) // 2):
            same = paired_auroc_delta(y2, a, a.copy(), groups=groups, n_boot=300)
            assert (same["value"], same["ci_low"], same["ci_high"]) == (0.0, 0.0, 0.0)
            assert same["method"] == "constant" and same["p_le_0"] == 1.0
        same_mean = paired_mean_delta(a, a.copy(), n_boot=300)
        assert (same_mean["value"], same_mean["ci_low"], same_mean["ci_high"]) == (0.0, 0.0, 0.0)


def test_mean_ci_leaves_out_nan_and_counts_it() -> None:
    values = np.array([0.8, 0.9, np.nan, 0.7, 0.85])
    m = mean_ci(values, n_boot=300, seed=0)
    assert m["value"] == pytest.approx(0.8125) and m["n"] == 4 and m["n_excluded"] == 1
    assert m["ci_low"] <= m["value"] <= m["ci_high"] and m["method"] == "BCa" and m["resampling"] == "simple"
    assert m == mean_ci(values, n_boot=300, seed=0)
    single = mean_ci(np.array([np.nan, 0.4, np.nan]))
    assert (single["value"], single["ci_low"], single["ci_high"], single["n"]) == (0.4, 0.4, 0.4, 1)
    assert single["n_excluded"] == 2 and single["method"] == "constant"
    empty = mean_ci(np.array([np.nan]))
    assert math.isnan(empty["value"]) and math.isnan(empty["ci_high"]) and empty["n"] == 0
    # with patients: the NaN entry's patient ("c") goes with it
    clustered = mean_ci(
        np.array([0.8, 0.9, np.nan, 0.7, 0.85, 0.6, 0.95]), groups=["a", "a", "c", "b", "b", "d", "e"], n_boot=300
    )
    assert clustered["resampling"] == "patient-clustered" and clustered["n_patients"] == 4
    assert clustered["value"] == pytest.approx(np.mean([0.8, 0.9, 0.7, 0.85, 0.6, 0.95]))
    assert clustered["ci_low"] < clustered["value"] < clustered["ci_high"]
    assert mean_ci(values, groups=[1, 2, 3, 4, 5], n_boot=300, seed=0) == {**m}  # one value per patient


def test_paired_auroc_delta_with_and_without_groups() -> None:
    rng = np.random.default_rng(1)
    y, _, patient = _clustered_data(rng, 100, 1.0, 1.0, 0.5)
    n = len(y)
    a = np.stack([y + rng.normal(0, 1.0, n) for _ in range(2)])
    b = y + rng.normal(0, 1.5, n)
    expected = np.mean([roc_auc_score(y, s) for s in a]) - roc_auc_score(y, b)
    d = paired_auroc_delta(y, a, b, n_boot=400, seed=3)
    assert set(d) == CI_KEYS | {"p_le_0"}
    assert d["value"] == pytest.approx(expected)
    assert d["ci_low"] < d["value"] < d["ci_high"] and (d["method"], d["resampling"]) == ("BCa", "stratified")
    assert 0 <= d["p_le_0"] < 0.5
    assert paired_auroc_delta(y, a, b, n_boot=400, seed=3) == d  # seeded
    c = paired_auroc_delta(y, a, b, groups=patient, n_boot=400, seed=3)
    assert c["value"] == d["value"] and c["resampling"] == "patient-clustered" and c["n_patients"] == 100
    assert c["ci_low"] < c["value"] < c["ci_high"] and c["method"] == "BCa"
    assert paired_auroc_delta(y, a, b, groups=patient, n_boot=400, seed=3) == c
    # the single-study AUROC CI and the paired one agree in the trivial case b = constant 0.5 scores
    half = paired_auroc_delta(y, a[0], np.full(n, 0.5), n_boot=400, seed=3)
    assert half["value"] == pytest.approx(roc_auc_score(y, a[0]) - 0.5)


def test_paired_mean_delta_skips_nan_pairs_with_and_without_groups() -> None:
    d = paired_mean_delta(np.array([[0.9, 0.8, np.nan, 0.7]]), np.array([[0.8, 0.8, 0.5, 0.6]]), n_boot=200)
    assert d["n"] == 3 and d["value"] == pytest.approx(0.2 / 3) and d["resampling"] == "simple"
    assert d["ci_low"] <= d["value"] <= d["ci_high"]
    rng = np.random.default_rng(4)
    a = rng.random((3, 80))
    b = a - 0.05 + rng.normal(0, 0.05, (3, 80))
    a[1, 7] = np.nan
    groups = np.arange(80) // 4
    plain = paired_mean_delta(a, b, n_boot=500, seed=1)
    clustered = paired_mean_delta(a, b, groups=groups, n_boot=500, seed=1)
    assert plain["n"] == clustered["n"] == 79 and clustered["n_patients"] == 20
    assert clustered["value"] == plain["value"] and clustered["resampling"] == "patient-clustered"
    for r in (plain, clustered):
        assert r["method"] == "BCa" and 0 < r["ci_low"] < r["value"] < r["ci_high"] and r["p_le_0"] == 0.0


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
