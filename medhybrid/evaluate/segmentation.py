"""Segmentation metrics per class per study: Dice, HD95 and NSD (MONAI), in millimetres of the scan.

The metrics are computed on the **reference mask's own grid**: the predicted mask is resampled from the
model's grid onto it (exactly as ``medhybrid infer`` maps it back to the scan, through world
coordinates), and distances use the mask's voxel spacing, so a distance means the same thing whatever
the model's preprocessing was. The mask's affine is always used, never just its shape: a mask stored
with a flipped axis, or a NIfTI mask of a DICOM series, is scored where it lies in space. A mask whose
grid does not lie on the image (less than :data:`MIN_OVERLAP` of its voxels inside the image's field of
view) is a :class:`~medhybrid.errors.GeometryMismatchError` naming both grids.

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
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.metrics import DiceMetric, HausdorffDistanceMetric, SurfaceDiceMetric
from monai.networks.utils import one_hot
from nibabel.orientations import aff2axcodes

from medhybrid.errors import GeometryMismatchError
from medhybrid.evaluate import bootstrap as B
from medhybrid.infer.resample import argmax_labels, lift_affine, to_native
from medhybrid.io.study import spacing_from_affine

DEFAULT_NSD_TOLERANCE_MM = 1.0
METRICS = ("dice", "hd95", "nsd")
MIN_OVERLAP = 0.9  # share of the reference mask's voxels that must lie inside the image's field of view
EMPTY_MASK_RULE = "both empty: excluded (counted); one side empty: Dice 0, NSD 0, HD95 = image diagonal"


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


def dice_with_empty_rule(pred: torch.Tensor, ref: torch.Tensor, n_classes: int) -> list[float]:
    """Foreground Dice per class of one case with the empty-mask rule of this module (one side empty: 0,
    both empty: NaN), from label maps ``(1, 1, *spatial)``; training's validation uses it, so that a
    model painting a class into a study without it is penalised there too."""
    yp, yr = one_hot(pred.long(), n_classes), one_hot(ref.long(), n_classes)
    dice = DiceMetric(include_background=False, reduction="none", ignore_empty=False)(yp, yr)
    assert isinstance(dice, torch.Tensor)
    out = []
    for c in range(1, n_classes):
        in_pred, in_ref = bool(yp[0, c].any()), bool(yr[0, c].any())
        out.append(float(dice[0, c - 1]) if in_pred and in_ref else 0.0 if in_pred or in_ref else math.nan)
    return out


def describe_grid(affine: np.ndarray, shape: Sequence[int]) -> str:
    """``64x64x32 voxels of 0.75x0.75x2.5 mm, axes LPS, origin (23.6, 23.6, -38.8)`` (for error messages)."""
    a = lift_affine(affine)
    codes = "".join(aff2axcodes(a, labels=(("L", "R"), ("P", "A"), ("I", "S"))))
    sp = "x".join(f"{v:.4g}" for v in spacing_from_affine(a))
    origin = ", ".join(f"{v:.1f}" for v in a[:3, 3])
    return f"{'x'.join(str(int(n)) for n in shape)} voxels of {sp} mm, axes {codes}, origin ({origin})"


def overlap(inner: np.ndarray, inner_shape: Sequence[int], outer: np.ndarray, outer_shape: Sequence[int]) -> float:
    """Share of the voxel centres of grid ``inner`` (on a lattice of at most 32 points per axis) that lie
    inside the field of view of grid ``outer``; both affines in one world frame."""
    axes = [np.linspace(0, n - 1, min(int(n), 32)) for n in inner_shape[:3]]
    pts = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)
    m = np.linalg.inv(lift_affine(outer)) @ lift_affine(inner)
    vox = pts @ m[:3, :3].T + m[:3, 3]
    size = np.asarray(outer_shape[:3], dtype=float)
    return float(np.mean(np.all((vox >= -0.5) & (vox <= size - 0.5), axis=1)))


def score_against_reference(
    seg_probs: torch.Tensor,
    model_affine: np.ndarray,
    image: tuple[np.ndarray, tuple[int, int, int]],
    reference: tuple[np.ndarray, np.ndarray, tuple[int, int, int]],
    spacing: Sequence[float],
    n_classes: int,
    *,
    nsd_tolerance_mm: float = DEFAULT_NSD_TOLERANCE_MM,
    mask_path: Path | None = None,
) -> tuple[dict[str, list[float]], bool]:
    """Dice/HD95/NSD of a predicted mask against a reference, on the reference's grid (module docstring).

    Args:
        seg_probs: ``(S, *spatial)`` on the model grid, whose affine is ``model_affine``.
        image: the study's ``(frame affine, spatial shape)``; frame affines are those of
            :func:`medhybrid.data.transforms.frame_affine` (RAS in 3D, the display frame in 2D).
        reference: the mask's ``(labels (I, J, K), frame affine, spatial shape)``.
        spacing: the mask's voxel size in mm.

    Returns:
        The scores, and whether the prediction had to be resampled onto a grid other than the image's.

    Raises:
        GeometryMismatchError: the mask does not lie on the image.
    """
    labels_ref, ref_affine, ref_shape = reference
    image_affine, image_shape = image
    share = overlap(ref_affine, ref_shape, image_affine, image_shape)
    if share < MIN_OVERLAP:
        raise GeometryMismatchError(
            f"the reference mask lies {share:.0%} inside the image (mask: {describe_grid(ref_affine, ref_shape)}; "
            f"image: {describe_grid(image_affine, image_shape)})",
            path=mask_path,
            fix="give the mask in the image's geometry (same world coordinates), or fix its header",
        )
    other_grid = tuple(ref_shape) != tuple(image_shape) or not np.allclose(
        lift_affine(ref_affine), lift_affine(image_affine), atol=1e-3
    )
    predicted = to_native(seg_probs, model_affine, ref_affine, ref_shape, argmax_labels)
    scores = segmentation_scores(predicted, labels_ref, spacing, n_classes, nsd_tolerance_mm=nsd_tolerance_mm)
    return scores, other_grid


def segmentation_summary(
    tables: Sequence[dict[str, list[float]]],
    class_names: dict[int, str],
    *,
    groups: Sequence[str] | None,
    n_boot: int,
    seed: int,
) -> dict[str, Any]:
    """Mean and CI (clustered by patient where ``groups`` are given) per metric per class, and of the
    per-study mean over classes, from per-study :func:`segmentation_scores`."""
    out: dict[str, Any] = {"n": len(tables), "per_class": {}, "mean": {}}
    for metric in METRICS:
        table = np.asarray([t[metric] for t in tables], dtype=np.float64)  # (N, classes)
        for c in range(table.shape[1]):
            entry = out["per_class"].setdefault(class_names.get(c + 1, f"class {c + 1}"), {})
            entry[metric] = B.mean_ci(table[:, c], groups=groups, n_boot=n_boot, seed=seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a study with every class empty: NaN, excluded
            per_study = np.nanmean(table, axis=1)
        out["mean"][metric] = B.mean_ci(per_study, groups=groups, n_boot=n_boot, seed=seed)
        if metric == "dice":
            out["n_both_empty"] = int(np.isnan(table).sum())  # (study, class) pairs with nothing on either side
    out["empty_mask_rule"] = EMPTY_MASK_RULE
    return out
