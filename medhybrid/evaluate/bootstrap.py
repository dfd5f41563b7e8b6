"""Bootstrap confidence intervals: AUROC and means (optionally clustered by patient) and paired differences
between models.

Confidence intervals are bias-corrected and accelerated (BCa) bootstrap intervals from
``scipy.stats.bootstrap``, seeded with ``numpy.random.default_rng(seed)``. BCa corrects the percentile
interval for the bias and skew of the bootstrap distribution (AUROC is bounded at 1 and skewed near it).
When BCa is undefined (a degenerate bootstrap distribution: perfect separation, identical models,
replicates without one class) the percentile interval of the same replicates is used, and if every
replicate is equal the interval is the point estimate; ``method`` says which (``"BCa"``,
``"percentile"``, ``"constant"``; ``"none"`` when the value itself is undefined).

Resampling:
    * ``stratified`` (AUROC without ``groups``): the abnormal and the normal studies are handed to scipy
      as two independent samples, which it resamples separately, so every replicate keeps both counts.
    * ``simple`` (means without ``groups``): the studies are resampled with replacement.
    * ``patient-clustered`` (``groups`` given, some patient with several studies): studies of one patient
      are correlated, so resampling studies understates the uncertainty. The sample handed to scipy is
      then the patients, ``arange(n_patients)``; the statistic turns each resampled index vector into
      per-study weights (how often the study's patient was drawn) and computes a weighted statistic.

Point estimates come from scikit-learn (``roc_auc_score``) or numpy. The bootstrap statistics are
written here, vectorised over all replicates of a batch at once, because scipy resamples observations
and evaluates whatever statistic it is given: the patient-clustered replicates need a *weighted*,
tie-exact Mann-Whitney AUROC, which no well-kept library offers, and calling ``roc_auc_score`` (or
``rankdata``) per replicate is 15-100x slower. The stratified AUROC hands scipy the scores' dense ranks
(integer codes of ``numpy.unique``) instead of the scores: they keep every order and tie, so the AUROC is
unchanged, and the statistic counts them with ``bincount`` instead of sorting each replicate.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from scipy.stats import bootstrap, rankdata

DEFAULT_BOOTSTRAP = 2000
# Rows (replicates, or jackknife samples for BCa) per statistic call are chosen so that rows times
# observations stays about this size: it bounds the memory (a few arrays of this many elements) and is
# about the fastest size on a CPU (the arrays stay within the caches).
_BATCH_ELEMENTS = 1_000_000

Statistic = Callable[..., np.ndarray]


def binary_labels(labels: np.ndarray) -> np.ndarray:
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


# --- bootstrap statistics -------------------------------------------------------------------------


def _dense_ranks(scores: np.ndarray) -> tuple[np.ndarray, int]:
    """Integer codes ``0..K-1`` of the scores in increasing order (equal scores, equal code) and ``K``."""
    unique, codes = np.unique(scores, return_inverse=True)
    return codes.astype(np.intp).reshape(-1), len(unique)


def _one_row(a: np.ndarray) -> np.ndarray | None:
    """The single row of ``a`` when all its rows (leading axes) are the same by construction (length 1 or
    a broadcast view, e.g. scipy's jackknife broadcasts the sample it does not leave one out of)."""
    if a.ndim == 1:
        return a
    if all(stride == 0 or size == 1 for stride, size in zip(a.strides[:-1], a.shape[:-1], strict=True)):
        return a[(0,) * (a.ndim - 1)]
    return None


def _rows(a: np.ndarray, lead: tuple[int, ...]) -> np.ndarray:
    return np.broadcast_to(a, lead + a.shape[-1:]).reshape(-1, a.shape[-1])


def _batched_bincount(codes: np.ndarray, k: int) -> np.ndarray:
    """Counts ``(R, k)`` of each code ``0..k-1`` in each row of ``codes`` ``(R, m)``."""
    r = codes.shape[0]
    offset = (np.arange(r, dtype=np.intp) * k)[:, None]
    return np.bincount((codes + offset).ravel(), minlength=r * k).reshape(r, k)


def _auroc_codes(x: np.ndarray, z: np.ndarray, k: int) -> np.ndarray:
    """Mann-Whitney AUROC of positive codes ``x`` ``(..., P)`` against negative codes ``z`` ``(..., N)``
    (dense ranks ``< k``; leading axes broadcast): the share of pairs with ``x > z``, ties counting 1/2,
    which is scikit-learn's ROC AUC. Per row: count the negatives at each code, their cumulative sum gives
    for each code ``2 * (#below + #equal / 2)``, gathered at the positives."""
    lead = np.broadcast_shapes(x.shape[:-1], z.shape[:-1])
    p, n = x.shape[-1], z.shape[-1]
    z1 = _one_row(z)
    counts = np.bincount(z1, minlength=k)[None] if z1 is not None else _batched_bincount(_rows(z, lead), k)
    twice_below = 2 * np.cumsum(counts, axis=1) - counts  # 2 * #(z < c) + #(z == c), per code c
    x1 = _one_row(x)
    if x1 is not None:
        num = twice_below @ np.bincount(x1, minlength=k)
    else:
        xr = _rows(x, lead)
        num = np.take_along_axis(np.broadcast_to(twice_below, (xr.shape[0], k)), xr, axis=1).sum(axis=1)
    auc = np.asarray(num / (2.0 * p * n), dtype=np.float64)
    return np.broadcast_to(auc.reshape(lead) if auc.size == math.prod(lead) else auc[0], lead)


class _WeightedAUROC:
    """Weighted Mann-Whitney AUROC of one score vector, for many weight vectors at once.

    With weight ``w_i`` on study ``i``: ``sum_{i pos, j neg} w_i w_j ([s_i > s_j] + [s_i == s_j] / 2) /
    (sum_pos w * sum_neg w)``. The negatives are sorted once; per row the cumulative sum of their weights,
    read at each positive's position among them (``searchsorted`` left and right: below, below or equal),
    gives the weight of the negatives below it plus half of those tied with it.

    ``columns``: for each study, the column of the weight matrix that holds its weight (the study itself,
    or its patient when the weights are patients' draw counts).
    """

    def __init__(self, scores: np.ndarray, positive: np.ndarray, columns: np.ndarray) -> None:
        pos, neg = np.flatnonzero(positive), np.flatnonzero(~positive)
        order = np.argsort(scores[neg], kind="stable")
        neg_sorted = scores[neg][order]
        self.neg_columns = columns[neg][order]
        self.pos_columns = columns[pos]
        self.below = np.searchsorted(neg_sorted, scores[pos], side="left")
        self.below_or_equal = np.searchsorted(neg_sorted, scores[pos], side="right")

    def __call__(self, weights: np.ndarray) -> np.ndarray:
        """AUROC ``(R,)`` for weights ``(R, columns)``; NaN where the positive or negative weight is 0."""
        w_neg = weights[:, self.neg_columns]
        cum = np.zeros((weights.shape[0], w_neg.shape[1] + 1), dtype=np.result_type(weights, np.int64))
        np.cumsum(w_neg, axis=1, out=cum[:, 1:])
        w_pos = weights[:, self.pos_columns]
        num = (w_pos * (cum[:, self.below] + cum[:, self.below_or_equal])).sum(axis=1)
        den = 2.0 * w_pos.sum(axis=1) * cum[:, -1]
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(den > 0, num / den, math.nan)


def weighted_auroc_replicates(labels: np.ndarray, scores: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Weighted AUROC for each row of per-study ``weights`` ``(R, N)`` (or ``(N,)``): study ``i`` counts
    ``w_i`` times. Unit weights give scikit-learn's ROC AUC; NaN where a class has no weight."""
    y = binary_labels(labels)
    w = np.atleast_2d(np.asarray(weights))
    return _WeightedAUROC(np.asarray(scores, dtype=np.float64), y, np.arange(len(y)))(w)


def _patients(groups: Any, n: int) -> tuple[np.ndarray, int]:
    """Patient index ``0..P-1`` of each study (in order of first appearance) and ``P``."""
    ids = groups.tolist() if isinstance(groups, np.ndarray) else list(groups)
    if len(ids) != n:
        raise ValueError(f"groups has {len(ids)} entries for {n} studies")
    index: dict[Any, int] = {}
    patient = np.fromiter((index.setdefault(g, len(index)) for g in ids), dtype=np.intp, count=n)
    return patient, len(index)


def _draw_counts(idx: np.ndarray, n_patients: int) -> tuple[np.ndarray, tuple[int, ...]]:
    """How often each patient was drawn, ``(R, n_patients)``, in each resample of patient indices
    ``(..., m)`` (``m`` is ``n_patients`` for a bootstrap resample, one less for a jackknife one), and the
    leading shape."""
    idx = np.asarray(idx)
    return _batched_bincount(idx.reshape(-1, idx.shape[-1]), n_patients), idx.shape[:-1]


def _fixing_singletons(samples: Sequence[np.ndarray], fn: Statistic) -> tuple[tuple[np.ndarray, ...], Statistic]:
    """scipy's data and statistic for ``fn(*samples)``. scipy refuses samples of one observation; each
    of their resamples is the sample itself, so they are held fixed and the others resampled."""
    free = [j for j, s in enumerate(samples) if len(s) > 1]

    def statistic(*resampled: np.ndarray, axis: int = -1) -> np.ndarray:
        full = list(samples)
        for j, r in zip(free, resampled, strict=True):
            full[j] = r
        return fn(*full)

    return tuple(samples[j] for j in free), statistic


def _bootstrap_ci(
    data: tuple[np.ndarray, ...], statistic: Statistic, value: float, *, n_boot: int, seed: int, level: float
) -> tuple[dict[str, Any], np.ndarray]:
    """BCa interval of ``statistic`` on ``data`` (scipy), with the fallbacks described in the module
    docstring, and the bootstrap distribution (empty when there is nothing to resample)."""
    if not math.isfinite(value):
        return {"ci_low": math.nan, "ci_high": math.nan, "method": "none"}, np.empty(0)
    if not data:  # one observation (or one patient): every resample is the data
        return {"ci_low": value, "ci_high": value, "method": "constant"}, np.full(n_boot, value)
    batch = max(1, _BATCH_ELEMENTS // sum(len(d) for d in data))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = bootstrap(
            data,
            statistic,
            n_resamples=n_boot,
            batch=batch,
            vectorized=True,
            method="BCa",
            confidence_level=level,
            random_state=np.random.default_rng(seed),
        )
    dist = np.asarray(res.bootstrap_distribution, dtype=np.float64)
    low, high = float(res.confidence_interval.low), float(res.confidence_interval.high)
    if math.isfinite(low) and math.isfinite(high):
        for w in caught:  # not a degenerate case: pass scipy's and numpy's warnings on
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        return {"ci_low": low, "ci_high": high, "method": "BCa"}, dist
    # BCa undefined (scipy warned with DegenerateDataWarning, or the jackknife was 0/0): dropped warnings
    finite = dist[np.isfinite(dist)]
    if finite.size and finite.min() < finite.max():
        low, high = (float(q) for q in np.quantile(finite, [(1 - level) / 2, (1 + level) / 2]))
        return {"ci_low": low, "ci_high": high, "method": "percentile"}, dist
    return {"ci_low": value, "ci_high": value, "method": "constant"}, dist


def _resampling(clustered: bool, unclustered: str) -> str:
    return "patient-clustered" if clustered else unclustered


# --- public CIs -----------------------------------------------------------------------------------


def auroc_ci(
    labels: np.ndarray,
    scores: np.ndarray,
    *,
    groups: Any = None,
    n_boot: int = DEFAULT_BOOTSTRAP,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, Any]:
    """AUROC (scikit-learn) and its BCa bootstrap CI.

    Without ``groups`` (or when every study has its own group) the bootstrap is stratified: the abnormal
    and the normal cases are resampled separately, keeping both counts. With ``groups`` (patient ids,
    aligned with ``labels``) patients are resampled with replacement, each drawn patient bringing all
    their studies (a replicate without one class is NaN and left out of the interval).

    Returns:
        ``value``, ``ci_low``, ``ci_high``, ``level``, ``n_boot``, ``seed``, ``n_pos``, ``n_neg``,
        ``method`` (``BCa``, ``percentile``, ``constant``, ``none``), ``resampling`` (``stratified``,
        ``patient-clustered``), and ``n_patients`` when clustered; NaN value and CI when a class is absent.
    """
    from sklearn.metrics import roc_auc_score

    y = binary_labels(labels)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if len(s) != len(y):
        raise ValueError(f"{len(s)} scores for {len(y)} labels")
    n_pos = int(y.sum())
    patient, n_patients = _patients(groups, len(y)) if groups is not None else (None, len(y))
    clustered = patient is not None and n_patients < len(y)
    out: dict[str, Any] = {
        "level": level,
        "n_boot": n_boot,
        "seed": seed,
        "n_pos": n_pos,
        "n_neg": len(y) - n_pos,
        "resampling": _resampling(clustered, "stratified"),
    }
    if clustered:
        out["n_patients"] = n_patients
    if not n_pos or n_pos == len(y):
        return {**out, "value": math.nan, "ci_low": math.nan, "ci_high": math.nan, "method": "none"}
    value = float(roc_auc_score(y, s))
    if clustered:
        assert patient is not None
        auc = _WeightedAUROC(s, y, patient)
        data, statistic = _fixing_singletons(
            [np.arange(n_patients)], lambda idx: auc(_draw_counts(idx, n_patients)[0]).reshape(idx.shape[:-1])
        )
    else:
        codes, k = _dense_ranks(s)
        data, statistic = _fixing_singletons([codes[y], codes[~y]], lambda x, z: _auroc_codes(x, z, k))
    ci, _ = _bootstrap_ci(data, statistic, value, n_boot=n_boot, seed=seed, level=level)
    return {**out, "value": value, **ci}


def _mean_bootstrap(
    values: np.ndarray, patient: np.ndarray | None, *, n_boot: int, seed: int, level: float
) -> tuple[float, dict[str, Any], np.ndarray, dict[str, Any]]:
    """Mean of the finite ``values`` (``patient``: their patient indices, or None), its CI, the bootstrap
    distribution, and the resampling keys."""
    n_patients, clustered = len(values), False
    if patient is not None and len(values):
        _, patient = np.unique(patient, return_inverse=True)  # renumber the patients that are left
        n_patients = int(patient.max()) + 1
        clustered = n_patients < len(values)
    keys: dict[str, Any] = {"resampling": _resampling(clustered, "simple")}
    if not len(values):
        return math.nan, {"ci_low": math.nan, "ci_high": math.nan, "method": "none"}, np.empty(0), keys
    if clustered:
        assert patient is not None
        keys["n_patients"] = n_patients
        sums = np.bincount(patient, weights=values, minlength=n_patients)
        sizes = np.bincount(patient, minlength=n_patients).astype(np.float64)

        def weighted_mean(idx: np.ndarray) -> np.ndarray:
            counts, lead = _draw_counts(idx, n_patients)
            return np.asarray((counts @ sums) / (counts @ sizes)).reshape(lead)

        data, statistic = _fixing_singletons([np.arange(n_patients)], weighted_mean)
    else:
        data, statistic = _fixing_singletons([values], lambda x: np.asarray(np.mean(x, axis=-1)))
    value = float(values.mean())
    ci, dist = _bootstrap_ci(data, statistic, value, n_boot=n_boot, seed=seed, level=level)
    return value, ci, dist, keys


def mean_ci(
    values: np.ndarray,
    *,
    groups: Any = None,
    n_boot: int = DEFAULT_BOOTSTRAP,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, Any]:
    """Mean of the finite values and its BCa bootstrap CI. NaN entries (e.g. Dice of an empty reference)
    are left out and counted. With ``groups`` (patient ids aligned with ``values``; the ids of NaN entries
    are dropped with them) patients are resampled: the replicate is the mean weighted by how often each
    value's patient was drawn.

    Returns:
        ``value``, ``ci_low``, ``ci_high``, ``n``, ``n_excluded``, ``level``, ``n_boot``, ``seed``,
        ``method``, ``resampling`` (``simple``, ``patient-clustered``), ``n_patients`` when clustered. One
        finite value gives ``ci_low == ci_high == value``; none gives NaN.
    """
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    keep = np.isfinite(v)
    patient = _patients(groups, len(v))[0][keep] if groups is not None else None
    value, ci, _, keys = _mean_bootstrap(v[keep], patient, n_boot=n_boot, seed=seed, level=level)
    return {
        "value": value,
        **ci,
        "n": int(keep.sum()),
        "n_excluded": int(len(v) - keep.sum()),
        "level": level,
        "n_boot": n_boot,
        "seed": seed,
        **keys,
    }


def _delta_summary(
    value: float, ci: dict[str, Any], dist: np.ndarray, keys: dict[str, Any], level: float, n_boot: int, seed: int
) -> dict[str, Any]:
    finite = dist[np.isfinite(dist)]
    # share of replicates where A is not better than B
    p_le_0 = float(np.mean(finite <= 0)) if finite.size else math.nan
    return {
        "value": value,
        "ci_low": ci["ci_low"],
        "ci_high": ci["ci_high"],
        "p_le_0": p_le_0,
        "level": level,
        "n_boot": n_boot,
        "seed": seed,
        "method": ci["method"],
        **keys,
    }


def _take(values: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """``values[idx]``, without materialising the rows of a broadcast index array."""
    row = _one_row(idx)
    return values[row] if row is not None else values[idx]


def _seed_matrix(scores: np.ndarray, n: int) -> np.ndarray:
    m = np.atleast_2d(np.asarray(scores, dtype=np.float64))
    if m.ndim != 2 or m.shape[1] != n:
        raise ValueError(f"scores must be (seeds, {n}) or ({n},), got shape {np.shape(scores)}")
    return m


def paired_auroc_delta(
    labels: np.ndarray,
    a: np.ndarray,
    b: np.ndarray,
    *,
    groups: Any = None,
    n_boot: int = DEFAULT_BOOTSTRAP,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, Any]:
    """AUROC(A) - AUROC(B) on the same studies, each averaged over training seeds, with a paired BCa
    bootstrap CI: each replicate resamples the studies once and scores every model and seed on it.
    Without ``groups`` the abnormal and the normal studies are resampled separately (stratified); with
    ``groups`` (patient ids) patients are resampled.

    Args:
        a, b: ``(seeds, N)`` (or ``(N,)``) scores of the two models (rows: seeds; columns: the same
            studies in order).

    Returns:
        ``value``, ``ci_low``, ``ci_high``, ``p_le_0`` (share of replicates with a difference <= 0),
        ``level``, ``n_boot``, ``seed``, ``method``, ``resampling``, ``n_patients`` when clustered.
    """
    from sklearn.metrics import roc_auc_score

    y = binary_labels(labels)
    a2, b2 = _seed_matrix(a, len(y)), _seed_matrix(b, len(y))
    pos, neg = np.flatnonzero(y), np.flatnonzero(~y)
    patient, n_patients = _patients(groups, len(y)) if groups is not None else (None, len(y))
    clustered = patient is not None and n_patients < len(y)
    keys: dict[str, Any] = {"resampling": _resampling(clustered, "stratified")}
    if clustered:
        keys["n_patients"] = n_patients
    if not len(pos) or not len(neg):
        value, ci, dist = math.nan, {"ci_low": math.nan, "ci_high": math.nan, "method": "none"}, np.empty(0)
        return _delta_summary(value, ci, dist, keys, level, n_boot, seed)
    value = float(np.mean([roc_auc_score(y, s) for s in a2]) - np.mean([roc_auc_score(y, s) for s in b2]))
    rows, n_a = np.concatenate([a2, b2]), len(a2)

    def delta(aucs: np.ndarray) -> np.ndarray:
        return np.asarray(aucs[:n_a].mean(axis=0) - aucs[n_a:].mean(axis=0))

    data: tuple[np.ndarray, ...]
    if clustered:
        assert patient is not None
        weighted = [_WeightedAUROC(r, y, patient) for r in rows]

        def clustered_delta(idx: np.ndarray) -> np.ndarray:
            counts, lead = _draw_counts(idx, n_patients)
            return delta(np.stack([auc(counts) for auc in weighted])).reshape(lead)

        data, statistic = _fixing_singletons([np.arange(n_patients)], clustered_delta)
    else:
        ranked = [(codes[pos], codes[neg], k) for codes, k in map(_dense_ranks, rows)]

        def stratified_delta(ip: np.ndarray, ineg: np.ndarray) -> np.ndarray:
            return delta(np.stack([_auroc_codes(_take(p, ip), _take(q, ineg), k) for p, q, k in ranked]))

        data, statistic = _fixing_singletons([np.arange(len(pos)), np.arange(len(neg))], stratified_delta)
    ci, dist = _bootstrap_ci(data, statistic, value, n_boot=n_boot, seed=seed, level=level)
    return _delta_summary(value, ci, dist, keys, level, n_boot, seed)


def paired_mean_delta(
    a: np.ndarray,
    b: np.ndarray,
    *,
    groups: Any = None,
    n_boot: int = DEFAULT_BOOTSTRAP,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, Any]:
    """Mean(A) - mean(B) of per-study values (e.g. Dice) on the same studies, averaged over seeds, with a
    paired BCa bootstrap CI over studies (over patients with ``groups``). ``a``, ``b``: ``(seeds, N)`` or
    ``(N,)``; studies NaN in either are left out (``n``: the studies kept).

    Returns:
        the keys of :func:`paired_auroc_delta` and ``n``.
    """
    a2 = np.atleast_2d(np.asarray(a, dtype=np.float64))
    b2 = _seed_matrix(b, a2.shape[1])
    keep = np.all(np.isfinite(a2), axis=0) & np.all(np.isfinite(b2), axis=0)
    d = a2[:, keep].mean(0) - b2[:, keep].mean(0)  # per-study difference of the seed means
    patient = _patients(groups, a2.shape[1])[0][keep] if groups is not None else None
    value, ci, dist, keys = _mean_bootstrap(d, patient, n_boot=n_boot, seed=seed, level=level)
    return {**_delta_summary(value, ci, dist, keys, level, n_boot, seed), "n": int(len(d))}
