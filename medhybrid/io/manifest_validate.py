"""Manifest validation: files exist, labels are consistent, masks match their images, splits do not leak.

:func:`validate_manifest` never raises for a bad row: it collects :class:`Problem` s in a
:class:`ValidationReport` (codes documented in ``docs/manifests.md``). It raises
:class:`~medhybrid.errors.ManifestError` only when the manifest itself cannot be read.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medhybrid.errors import MedHybridError
from medhybrid.io.manifest import AFFINE_ATOL_MM, KNOWN_SPLITS, TASKS, Manifest, ManifestRow, read_manifest
from medhybrid.io.readers import image_format, load_nifti, read_geometry, read_image

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Problem:
    """One validation finding: CSV line and study (when known), a stable code, a message for people."""

    line: int | None
    study_id: str | None
    code: str
    message: str

    def __str__(self) -> str:
        where = ", ".join(p for p in (f"line {self.line}" if self.line else "", self.study_id or "") if p)
        return f"{self.code}: {where + ': ' if where else ''}{self.message}"

    def as_dict(self) -> dict[str, Any]:
        return {"line": self.line, "study_id": self.study_id, "code": self.code, "message": self.message}


@dataclass
class ValidationReport:
    """The findings of :func:`validate_manifest`; ``ok`` when there is no error (warnings allowed)."""

    path: Path
    rows: int = 0
    errors: list[Problem] = field(default_factory=list)
    warnings: list[Problem] = field(default_factory=list)
    split_counts: dict[str, int] = field(default_factory=dict)
    label_counts: dict[str, dict[int, int]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.errors

    def error(self, row: ManifestRow | None, code: str, message: str) -> None:
        self.errors.append(Problem(row.line if row else None, row.study_id if row else None, code, message))

    def warn(self, row: ManifestRow | None, code: str, message: str) -> None:
        self.warnings.append(Problem(row.line if row else None, row.study_id if row else None, code, message))

    def codes(self) -> set[str]:
        """The codes of all errors and warnings (handy in tests and scripts)."""
        return {p.code for p in self.errors + self.warnings}

    def as_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "ok": self.ok,
            "rows": self.rows,
            "errors": [p.as_dict() for p in self.errors],
            "warnings": [p.as_dict() for p in self.warnings],
            "split_counts": dict(self.split_counts),
            "label_counts": {s: {str(k): n for k, n in c.items()} for s, c in self.label_counts.items()},
        }


def validate_manifest(path: Path, *, check_geometry: bool = True) -> ValidationReport:
    """Check a manifest's rows, files, labels, splits and (``check_geometry``) masks; see docs/manifests.md.

    Never raises for a bad row: problems are collected in the report.

    Raises:
        ManifestError: the manifest itself cannot be read (see :func:`read_manifest`).
    """
    manifest = read_manifest(path)
    report = ValidationReport(path=Path(path), rows=len(manifest.rows))
    if not manifest.rows:
        report.warn(None, "empty", "the manifest lists no studies")
    for row in manifest.rows:
        _check_row_files(row, report)
    _check_ids(manifest, report)
    _check_labels(manifest, report)
    if check_geometry:
        for row in manifest.rows:
            if row.mask is not None and row.mask.is_file() and row.image.exists():
                _check_mask(row, manifest.mask_label_names, report)
    for split in manifest.splits():
        report.split_counts[split] = len(manifest.split(split))
        if any(r.label is not None for r in manifest.split(split)):
            report.label_counts[split] = manifest.label_counts(split)
    logger.info("%s: %d rows, %d errors, %d warnings", path, report.rows, len(report.errors), len(report.warnings))
    return report


def _check_row_files(row: ManifestRow, report: ValidationReport) -> None:
    if row.image.is_dir():
        if not _holds_a_file(row.image):
            report.error(row, "image_empty_folder", f"image folder {row.image} holds no file")
    elif not row.image.is_file():
        report.error(row, "image_missing", f"image {row.image} does not exist")
    elif image_format(row.image) is None:
        report.error(row, "unsupported_format", f"image {row.image.name}: not NIfTI/NRRD/MHA/PNG or a DICOM folder")
    if row.mask is not None:
        if not row.mask.is_file():
            what = "is a folder, not a label-map file" if row.mask.is_dir() else "does not exist"
            report.error(row, "mask_missing", f"mask {row.mask} {what}")
        elif image_format(row.mask) is None:
            report.error(row, "unsupported_format", f"mask {row.mask.name}: not NIfTI/NRRD/MHA/PNG")
    if not row.split:
        report.error(row, "split_missing", "empty split (use train, val or test)")


def _holds_a_file(folder: Path) -> bool:
    return any(files for _root, _dirs, files in os.walk(folder))


def _check_ids(manifest: Manifest, report: ValidationReport) -> None:
    seen: dict[tuple[str, str], ManifestRow] = {}
    id_splits: dict[str, dict[str, ManifestRow]] = {}
    image_splits: dict[Path, dict[str, ManifestRow]] = {}
    for row in manifest.rows:
        key = (row.split, row.study_id)
        if key in seen:
            report.error(
                row,
                "duplicate_id",
                f"study_id repeated in split {row.split!r} (first on line {seen[key].line})",
            )
            continue
        seen[key] = row
        id_splits.setdefault(row.study_id, {}).setdefault(row.split, row)
        image_key = row.image.resolve()
        first = image_splits.setdefault(image_key, {}).setdefault(row.split, row)
        if first is not row and first.study_id != row.study_id:
            report.warn(row, "duplicate_image", f"same image as {first.study_id} (line {first.line}) in {row.split!r}")
    for study_id, by_split in id_splits.items():
        if len(by_split) > 1:
            rows = list(by_split.values())
            report.error(rows[1], "leak_id", f"study_id {study_id} is in splits {_where(by_split)}")
    for image, by_split in image_splits.items():
        rows = list(by_split.values())
        if len(by_split) > 1 and len({r.study_id for r in rows}) > 1:  # same id: already a leak_id
            report.error(rows[1], "leak_image", f"image {image} is in splits {_where(by_split)}")
    patient_splits: dict[str, dict[str, ManifestRow]] = {}
    for row in manifest.rows:
        if row.patient_id:
            patient_splits.setdefault(row.patient_id, {}).setdefault(row.split, row)
    for by_split in patient_splits.values():
        if len(by_split) > 1:  # the studies of one patient are not independent: they must share a split
            # the patient_id itself is not printed: it may be a real identifier
            rows = list(by_split.values())
            report.error(rows[1], "leak_patient", f"this study's patient also has studies in {_where(by_split)}")
    for split in manifest.splits():
        if split and split not in KNOWN_SPLITS:
            rows = manifest.split(split)
            report.warn(rows[0], "split_unknown", f"split {split!r} ({len(rows)} rows) is not train/val/test")


def _where(by_split: dict[str, ManifestRow]) -> str:
    return ", ".join(f"{s!r} (line {r.line})" for s, r in by_split.items())


def _check_labels(manifest: Manifest, report: ValidationReport) -> None:
    labelled = [r for r in manifest.rows if r.label is not None]
    unlabelled = [r for r in manifest.rows if r.label is None]
    if labelled and unlabelled:
        report.warn(unlabelled[0], "labels_partial", f"{len(unlabelled)} of {len(manifest.rows)} rows have no label")
    names = manifest.label_names
    labels_of: dict[str, dict[int, ManifestRow]] = {}
    for row in labelled:
        assert row.label is not None
        if names and row.label not in names:
            report.error(row, "label_unknown", f"label {row.label} is not in the sidecar's label_names {sorted(names)}")
        labels_of.setdefault(row.study_id, {}).setdefault(row.label, row)
    for study_id, by_label in labels_of.items():
        if len(by_label) > 1:
            found = ", ".join(f"{label} (line {r.line})" for label, r in by_label.items())
            report.error(list(by_label.values())[1], "label_conflict", f"study_id {study_id} has labels {found}")
    if labelled:
        for split in manifest.splits():
            classes = manifest.label_counts(split)
            if len(classes) == 1:
                report.warn(None, "single_class", f"split {split!r} has a single class: {next(iter(classes))}")
    task = manifest.task
    if task is not None and task not in TASKS:
        report.warn(None, "task_unknown", f"sidecar task {task!r} is not one of {list(TASKS)}")
    if task in ("classification", "multitask") and manifest.rows and not labelled:
        report.error(None, "task_mismatch", f"task is {task} but no row has a label")
    if task in ("segmentation", "multitask") and manifest.rows and all(r.mask is None for r in manifest.rows):
        report.error(None, "task_mismatch", f"task is {task} but no row has a mask")


def _check_mask(row: ManifestRow, mask_names: dict[int, str], report: ValidationReport) -> None:
    """Mask vs image geometry (shape equal, affine within 1e-3 mm), then the mask's values."""
    assert row.mask is not None
    if row.image.is_dir():
        report.warn(row, "mask_not_checked", "image is a DICOM folder: mask geometry not checked")
    else:
        try:
            image_shape, image_affine = read_geometry(row.image)
        except MedHybridError as exc:
            report.error(row, "image_unreadable", f"image header: {exc.message}")
            return
        try:
            mask_shape, mask_affine = read_geometry(row.mask)
        except MedHybridError as exc:
            report.error(row, "mask_unreadable", f"mask header: {exc.message}")
            return
        if tuple(image_shape) != tuple(mask_shape):
            report.error(row, "mask_shape_mismatch", f"mask shape {tuple(mask_shape)} != image {tuple(image_shape)}")
        elif not np.allclose(image_affine, mask_affine, rtol=0.0, atol=AFFINE_ATOL_MM):
            diff = float(np.max(np.abs(np.asarray(image_affine) - np.asarray(mask_affine))))
            report.error(row, "mask_affine_mismatch", f"mask affine differs from the image's by up to {diff:.4g} mm")
    _check_mask_values(row, mask_names, report)


def _check_mask_values(row: ManifestRow, mask_names: dict[int, str], report: ValidationReport) -> None:
    assert row.mask is not None
    try:
        if image_format(row.mask) == "nifti":
            values = np.unique(np.asanyarray(load_nifti(row.mask).dataobj))
        else:
            values = np.unique(read_image(row.mask, dtype=np.float64).array)
    except MedHybridError as exc:
        report.error(row, "mask_unreadable", f"mask: {exc.message}")
        return
    except Exception as exc:  # nibabel raises many types on damaged files
        report.error(row, "mask_unreadable", f"mask: {type(exc).__name__}: {str(exc)[:160]}")
        return
    values = values.astype(np.float64)
    bad = values[~np.isfinite(values) | (values < 0) | (np.mod(values, 1.0) != 0)]
    if bad.size:
        report.error(row, "mask_values", f"mask holds values that are not non-negative integers: {bad[:5].tolist()}")
        return
    unknown = sorted(int(v) for v in values if int(v) not in mask_names)
    if mask_names and unknown:
        report.error(row, "mask_label_unknown", f"mask values {unknown[:10]} are not in mask_label_names")
