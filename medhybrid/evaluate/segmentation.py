"""Segmentation metrics per class per study: Dice, HD95 and NSD (MONAI), in millimetres of the scan.

The metrics are computed on the scan's own grid (the predicted mask resampled back, as ``medhybrid
infer`` writes it) with the scan's voxel spacing, so a distance means the same thing whatever the model's
preprocessing was.

Empty-mask rule (per class, per study), applied here before MONAI is called, because MONAI returns NaN
or inf with a warning in these cases and scores differ between its metrics:

=====================  =========  =====================  =========
reference / predicted  Dice       HD95                   NSD
=====================  =========  =====================  =========
both present           MONAI      MONAI (95th pct.)      MONAI
present / empty        0          image diagonal (mm)    0
empty / present        0          image diagonal (mm)    0
both empty             excluded   excluded               excluded
=====================  =========  =====================  =========

"Excluded" cases are NaN in the per-study table, left out of the means and counted (``n_both_empty``):
a correct "nothing there" is not evidence about contour quality. A missed or hallucinated structure gets
the worst possible distance (the image diagonal) instead of being dropped, so HD95 cannot improve by
missing structures.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
import torch
from monai.metrics import DiceMetric, HausdorffDistanceMetric, SurfaceDiceMetric
from monai.networks.utils import one_hot

DEFAULT_NSD_TOLERANCE_MM = 1.0
METRICS = ("dice", "hd95", "nsd")


def _squeeze_2d(a: np.ndarray) -> np.ndarray:
    """``(I, J, 1)`` -> ``(I, J)``: a 2D image's surfaces are its contours, not the faces of a 1-voxel slab."""
    return a[:, :, 0] if a.ndim == 3 and a.shape[2] == 1 else a


def segmentation_scores(
    pred: np.ndarray,
    ref: np.ndarray,
    spacing: Sequence[float],
    n_classes: int,
    *,
    nsd_tolerance_mm: float = DEFAULT_NSD_TOLERANCE_MM,
) -> dict[str, list[float]]:
    """Dice, HD95 (mm) and NSD at ``nsd_tolerance_mm`` for each foreground class ``1..n_classes-1``.

    Args:
        pred, ref: integer label maps of the same shape ``(I, J, K)`` (or ``(I, J, 1)`` for 2D).
        spacing: voxel size in mm along I, J, K.

    Returns:
        ``{"dice": [...], "hd95": [...], "nsd": [...]}`` with one value per foreground class (see the
        module docstring for empty masks).
    """
    p, r = _squeeze_2d(np.asarray(pred)), _squeeze_2d(np.asarray(ref))
    if p.shape != r.shape:
        raise ValueError(f"prediction {p.shape} and reference {r.shape} differ in shape")
    sp = [float(s) for s in spacing][: p.ndim]
    diagonal = float(math.sqrt(sum((n * s) ** 2 for n, s in zip(p.shape, sp, strict=True))))
    yp = one_hot(torch.as_tensor(p.astype(np.int64))[None, None], n_classes)
    yr = one_hot(torch.as_tensor(r.astype(np.int64))[None, None], n_classes)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MONAI warns on empty classes; they are overridden below
        # the metric objects' __call__ is typed as returning a sequence; with tensors in, a tensor comes out
        dice = torch.as_tensor(DiceMetric(include_background=False, reduction="none", ignore_empty=False)(yp, yr))
        hd95 = torch.as_tensor(
            HausdorffDistanceMetric(include_background=False, percentile=95, reduction="none")(yp, yr, spacing=sp)
        )
        nsd = torch.as_tensor(
            SurfaceDiceMetric([nsd_tolerance_mm] * (n_classes - 1), include_background=False, reduction="none")(
                yp, yr, spacing=sp
            )
        )
    out: dict[str, list[float]] = {m: [] for m in METRICS}
    for c in range(1, n_classes):
        in_pred, in_ref = bool(yp[0, c].any()), bool(yr[0, c].any())
        if in_pred and in_ref:
            values = (float(dice[0, c - 1]), float(hd95[0, c - 1]), float(nsd[0, c - 1]))
        elif in_pred or in_ref:
            values = (0.0, diagonal, 0.0)
        else:
            values = (math.nan, math.nan, math.nan)
        for name, v in zip(METRICS, values, strict=True):
            out[name].append(v)
    return out
