"""Slice geometry of a DICOM series: order the slices, check they form one regular volume, build the affine.

Written by hand because no library does this *and fails closed*: SimpleITK/GDCM and MONAI's ITKReader
read an irregular series with a warning at most (a missing slice silently stretches the volume), and
pydicom leaves geometry to the caller. Every check here raises a typed error naming the files.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from medhybrid.errors import (
    DuplicatePositionError,
    GantryTiltError,
    InvalidTagError,
    MissingPositionError,
    MissingSliceError,
    MixedMatrixError,
    MixedOrientationError,
    UnevenSpacingError,
)
from medhybrid.io.dicom_files import SliceHeader
from medhybrid.io.study import QCReason, Verdict


@dataclass(frozen=True)
class IngestOptions:
    """Tolerances of the series checks (all configurable from the CLI and pipelines).

    Attributes:
        spacing_tolerance: largest accepted relative deviation of a slice gap from the median gap;
            above it the series is rejected (uneven spacing, or missing slices when a gap is a whole
            multiple of the median).
        spacing_warn: relative deviation above which an accepted series gets a warning.
        orientation_tolerance: largest accepted difference between direction cosines of two slices.
        tilt_tolerance_deg: largest accepted angle between the slice stacking direction and the normal.
        duplicate_tolerance_mm: two slices closer than this along the normal share a position.
    """

    spacing_tolerance: float = 0.01
    spacing_warn: float = 0.001
    orientation_tolerance: float = 1e-4
    tilt_tolerance_deg: float = 0.5
    duplicate_tolerance_mm: float = 1e-3


@dataclass
class SeriesGeometry:
    """Result of :func:`series_geometry`: slice order and the voxel-to-LPS affine."""

    order: list[int]
    affine_lps: np.ndarray
    slice_spacing: float
    reasons: list[QCReason] = field(default_factory=list)


def _where(h: SliceHeader) -> str:
    return f"{h.path}" + (f"[frame {h.frame}]" if h.n_frames > 1 else "")


def check_matrix(headers: Sequence[SliceHeader]) -> None:
    sizes = Counter((h.rows, h.cols, h.samples) for h in headers)
    if len(sizes) > 1:
        desc = ", ".join(f"{r}x{c}x{s} ({n} slices)" for (r, c, s), n in sizes.most_common())
        minority = [h.path for h in headers if (h.rows, h.cols, h.samples) != sizes.most_common(1)[0][0]]
        raise MixedMatrixError(
            f"slices of one series have different matrix sizes (rows x columns x samples): {desc}",
            files=minority,
            fix="split the series, or remove the odd slices",
        )
    spacings = Counter(h.pixel_spacing for h in headers)
    if len(spacings) > 1:
        raise MixedMatrixError(
            f"slices of one series have different PixelSpacing: {sorted(spacings, key=str)}",
            files=[h.path for h in headers if h.pixel_spacing != spacings.most_common(1)[0][0]],
            fix="split the series, or remove the odd slices",
        )


def series_geometry(headers: Sequence[SliceHeader], options: IngestOptions | None = None) -> SeriesGeometry:
    """Order ``headers`` along the slice normal and build the voxel-to-LPS affine.

    Raises:
        MixedMatrixError, MissingPositionError, MixedOrientationError, DuplicatePositionError,
        GantryTiltError, MissingSliceError, UnevenSpacingError
    """
    opts = options or IngestOptions()
    check_matrix(headers)
    reasons: list[QCReason] = []
    first = headers[0]
    if first.pixel_spacing is None:
        reasons.append(QCReason(Verdict.WARN, "no_pixel_spacing", "no PixelSpacing: 1 mm pixels assumed"))
        row_mm, col_mm = 1.0, 1.0
    else:
        row_mm, col_mm = first.pixel_spacing
        if first.spacing_tag == "ImagerPixelSpacing":
            reasons.append(
                QCReason(
                    Verdict.OK,
                    "imager_pixel_spacing",
                    "spacing from ImagerPixelSpacing (detector plane; geometric magnification not corrected)",
                )
            )

    if len(headers) == 1:
        return _single_slice(first, row_mm, col_mm, reasons)

    missing = [h for h in headers if h.position is None or h.orientation is None]
    if missing:
        raise MissingPositionError(
            f"{len(missing)} of {len(headers)} slices lack ImagePositionPatient/ImageOrientationPatient, "
            "so they cannot be ordered in space",
            files=[_where(h) for h in missing],
            fix="re-export the series with patient geometry, or load the images one by one as 2D",
        )
    orientations = np.array([h.orientation for h in headers], dtype=float)
    spread = np.abs(orientations - orientations[0]).max(axis=1)
    if spread.max() > opts.orientation_tolerance:
        distinct = Counter(tuple(np.round(o, 4)) for o in orientations)
        raise MixedOrientationError(
            f"slices have {len(distinct)} different orientations: "
            + "; ".join(f"{list(o)} x{n}" for o, n in distinct.most_common()),
            files=[_where(h) for h, s in zip(headers, spread, strict=True) if s > opts.orientation_tolerance],
            fix="split the series by ImageOrientationPatient (e.g. remove localizer images)",
        )
    row_dir, col_dir = direction_cosines(orientations[0], first, reasons)
    normal = np.cross(row_dir, col_dir)
    positions = np.array([h.position for h in headers], dtype=float)
    along = positions @ normal
    order = [int(i) for i in np.argsort(along, kind="stable")]
    d = along[order]
    gaps = np.diff(d)

    dup = np.flatnonzero(gaps < opts.duplicate_tolerance_mm)
    if dup.size:
        pairs = [f"{_where(headers[order[i]])} = {_where(headers[order[i + 1]])}" for i in dup[:3]]
        raise DuplicatePositionError(
            f"{dup.size} slice(s) share a position with another slice at "
            f"{', '.join(f'{d[i]:.3f} mm' for i in dup[:5])} along the normal: " + "; ".join(pairs),
            fix="remove duplicated files, or split echoes/phases into separate series",
        )

    displacement = positions[order[-1]] - positions[order[0]]
    on_normal = float(displacement @ normal)
    off_normal = float(np.linalg.norm(displacement - on_normal * normal))
    tilt = math.degrees(math.atan2(off_normal, on_normal))
    if tilt > opts.tilt_tolerance_deg:
        raise GantryTiltError(
            f"slices advance at {tilt:.2f} degrees to the slice normal (gantry tilt or sheared stack; "
            f"tolerance {opts.tilt_tolerance_deg} degrees)",
            files=[headers[order[0]].path, headers[order[-1]].path],
            fix="resample the series to an orthogonal grid (e.g. dcm2niix corrects gantry tilt) before ingest",
        )

    nominal = float(np.median(gaps))
    deviation = np.abs(gaps - nominal) / nominal
    if deviation.max() > opts.spacing_tolerance:
        ratio = gaps / nominal
        whole = (ratio > 1.5) & (np.abs(ratio - np.round(ratio)) < 0.1)
        if whole.any():
            n_missing = int(np.sum(np.round(ratio[whole]) - 1))
            where = ", ".join(f"{d[i]:.2f}..{d[i + 1]:.2f} mm" for i in np.flatnonzero(whole)[:5])
            raise MissingSliceError(
                f"{n_missing} slice(s) missing (gaps of a whole number of {nominal:.3f} mm spacings at {where})",
                files=[headers[order[i]].path for i in np.flatnonzero(whole)[:5]],
                fix="re-send the complete series from PACS",
            )
        worst = int(np.argmax(deviation))
        raise UnevenSpacingError(
            f"slice spacing varies from {gaps.min():.4f} to {gaps.max():.4f} mm (median {nominal:.4f}; "
            f"largest deviation {deviation.max():.1%} > tolerance {opts.spacing_tolerance:.1%})",
            files=[headers[order[worst]].path, headers[order[worst + 1]].path],
            fix="resample the series to even spacing, or raise the spacing tolerance if this is expected",
        )
    if deviation.max() > opts.spacing_warn:
        reasons.append(
            QCReason(
                Verdict.WARN,
                "spacing_jitter",
                f"slice spacing jitters by up to {deviation.max():.2%} (mean spacing used)",
            )
        )
    spacing = float((d[-1] - d[0]) / (len(d) - 1))
    affine = _affine(row_dir, col_dir, normal, row_mm, col_mm, spacing, positions[order[0]])
    _check_finite(affine, first)
    return SeriesGeometry(order=order, affine_lps=affine, slice_spacing=spacing, reasons=reasons)


def _single_slice(h: SliceHeader, row_mm: float, col_mm: float, reasons: list[QCReason]) -> SeriesGeometry:
    thickness = h.slice_thickness if h.slice_thickness and h.slice_thickness > 0 else 1.0
    if h.position is not None and h.orientation is not None:
        row_dir, col_dir = direction_cosines(np.array(h.orientation, dtype=float), h, reasons)
        origin = np.array(h.position, dtype=float)
    else:
        reasons.append(
            QCReason(
                Verdict.WARN,
                "no_patient_geometry",
                "no ImagePositionPatient/ImageOrientationPatient: axial orientation at the origin assumed",
            )
        )
        row_dir, col_dir, origin = np.array([1.0, 0, 0]), np.array([0, 1.0, 0]), np.zeros(3)
    normal = np.cross(row_dir, col_dir)
    affine = _affine(row_dir, col_dir, normal, row_mm, col_mm, thickness, origin)
    _check_finite(affine, h)
    return SeriesGeometry(order=[0], affine_lps=affine, slice_spacing=thickness, reasons=reasons)


# ImageOrientationPatient's two cosines must be unit vectors at right angles. Exports round them (to 6 or so
# digits), so small errors are repaired (Gram-Schmidt) and noted; larger ones describe no plane and reject.
ORTHOGONAL_TOLERANCE = 1e-2  # |cos| of the angle between rows and columns (about 0.6 degrees)
UNIT_TOLERANCE = 1e-2


def direction_cosines(
    orientation: np.ndarray, h: SliceHeader, reasons: list[QCReason]
) -> tuple[np.ndarray, np.ndarray]:
    """The row and column direction cosines of ImageOrientationPatient, orthonormal.

    Raises:
        InvalidTagError: a zero, non-unit or non-perpendicular pair (a singular or sheared affine).
    """
    row, col = np.asarray(orientation[:3], dtype=float), np.asarray(orientation[3:], dtype=float)
    norms = (float(np.linalg.norm(row)), float(np.linalg.norm(col)))
    if max(abs(n - 1.0) for n in norms) > UNIT_TOLERANCE:
        raise InvalidTagError(
            f"ImageOrientationPatient {list(orientation)} is not two unit vectors (lengths {norms[0]:.4g}, "
            f"{norms[1]:.4g})",
            path=h.path,
            fix="correct ImageOrientationPatient (two perpendicular unit vectors)",
        )
    row, col = row / norms[0], col / norms[1]
    cosine = float(row @ col)
    if abs(cosine) > ORTHOGONAL_TOLERANCE:
        raise InvalidTagError(
            f"ImageOrientationPatient rows and columns are {math.degrees(math.acos(max(-1.0, min(1.0, cosine)))):.2f}"
            " degrees apart, not 90",
            path=h.path,
            fix="correct ImageOrientationPatient (two perpendicular unit vectors)",
        )
    if abs(cosine) > 1e-6 or max(abs(n - 1.0) for n in norms) > 1e-6:
        col = col - cosine * row
        col /= np.linalg.norm(col)
        reasons.append(
            QCReason(Verdict.OK, "orientation_rounded", "ImageOrientationPatient orthonormalised (rounded cosines)")
        )
    return row, col


def _check_finite(affine: np.ndarray, h: SliceHeader) -> None:
    if not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise InvalidTagError(
            "the pixel spacing and positions give no valid voxel-to-patient matrix (overflow or zero spacing)",
            path=h.path,
            fix="correct PixelSpacing / ImagePositionPatient / SliceThickness",
        )


def _affine(
    row_dir: np.ndarray,
    col_dir: np.ndarray,
    normal: np.ndarray,
    row_mm: float,
    col_mm: float,
    slice_mm: float,
    origin: np.ndarray,
) -> np.ndarray:
    """Voxel (i=column, j=row, k=slice) to LPS. PixelSpacing = (between rows, between columns)."""
    affine = np.eye(4)
    affine[:3, 0] = row_dir * col_mm
    affine[:3, 1] = col_dir * row_mm
    affine[:3, 2] = normal * slice_mm
    affine[:3, 3] = origin
    return affine
