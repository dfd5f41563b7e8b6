"""What a model may be trusted to assess, and the rules that make a study NOT ASSESSED.

A checkpoint declares its scope (``scope``, written by training from its pipeline and its training
images): the modalities it was trained on, its spatial dimensions, the range of native voxel spacings it
saw, and its intensity preset. A study outside it is reported **NOT ASSESSED** with the reasons, never
NORMAL: the model has not seen anything like it, so its score would mean nothing. ``--force`` assesses
anyway and the report says so (QC flag ``assessed_out_of_scope``).

The rules (docs/inference.md):

- ``modality``: the study's modality is not one the model was trained on (a CT model given MR, US, an
  X-ray). Studies of unknown modality (``OT``: a NIfTI file) are assessed, with a QC warning.
- ``body_part``: the study's DICOM BodyPartExamined is not one of the pipeline's ``body_parts`` (a chest
  model given a HEAD series). A study that names no body part (most CT, every NIfTI) is not refused on it.
- ``dimensions``: a 2D model given a volume, or a 3D model given a single slice (a scout, a radiograph).
- ``localizer``: a DICOM series whose ImageType says LOCALIZER (a scout / topogram).
- ``spacing``: a native voxel spacing below half the smallest or above twice the largest the model was
  trained on (per axis).
- ``field_of_view``: the model's input covered less than :data:`MIN_COVERAGE` of the scan (the rest was
  not looked at); or the scan is a sliver: its shortest side spans less than half the shortest side of
  the smallest training image (``extent_min``, in mm), so the model would see mostly padding (a 4-slice
  slab of a 512^2 CT, a downsized thumbnail).
- ``qc_reject``: ingestion's QC rejected the series.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medhybrid.infer.report import ScopeReason as Reason
from medhybrid.io.study import Study

MIN_COVERAGE = 0.95  # share of the scan that must lie inside the model's input
SPACING_FACTOR = 2.0  # native spacing may be this much finer or coarser than the training range


@dataclass
class Scope:
    """The model's declared scope (see the module docstring)."""

    modalities: tuple[str, ...] = ()
    body_parts: tuple[str, ...] = ()
    spatial_dims: int = 3
    spacing_min: tuple[float, ...] | None = None
    spacing_max: tuple[float, ...] | None = None
    intensity: str | None = None
    n_train: int | None = None
    extent_min: float | None = None  # mm: the shortest side of the smallest training image

    def as_dict(self) -> dict[str, Any]:
        return {
            "modalities": list(self.modalities),
            "body_parts": list(self.body_parts),
            "spatial_dims": self.spatial_dims,
            "spacing_min": list(self.spacing_min) if self.spacing_min else None,
            "spacing_max": list(self.spacing_max) if self.spacing_max else None,
            "intensity": self.intensity,
            "n_train": self.n_train,
            "extent_min": self.extent_min,
        }


def scope_from_checkpoint(ckpt: Mapping[str, Any]) -> Scope:
    """The checkpoint's ``scope``; for checkpoints written before it existed, what its preprocessing says
    (modality and dimensions, no spacing range)."""
    pre = ckpt.get("preprocessing") or {}
    declared = ckpt.get("scope") or {}
    modalities = declared.get("modalities") or ([pre["modality"]] if pre.get("modality") else [])
    return Scope(
        modalities=tuple(str(m).upper() for m in modalities),
        body_parts=tuple(str(b).upper() for b in declared.get("body_parts") or pre.get("body_parts") or ()),
        spatial_dims=int(declared.get("spatial_dims") or pre.get("spatial_dims") or 3),
        spacing_min=_floats(declared.get("spacing_min")),
        spacing_max=_floats(declared.get("spacing_max")),
        intensity=declared.get("intensity") or pre.get("intensity"),
        n_train=declared.get("n_train"),
        extent_min=float(declared["extent_min"]) if declared.get("extent_min") else None,
    )


def _floats(values: Any) -> tuple[float, ...] | None:
    return tuple(float(v) for v in values) if values else None


def training_scope(
    data_cfg: Any, spacings: Sequence[Sequence[float]], extents: Sequence[Sequence[float]] = ()
) -> dict[str, Any]:
    """The ``scope`` a training run records: its pipeline's modality, its dimensions, the per-axis range of
    its training images' native spacings, and the shortest side (mm) of the smallest of them (``extents``:
    each image's physical size per axis)."""
    declared = [data_cfg.modality] if data_cfg.modality else []
    dims = int(data_cfg.spatial_dims)
    arr = np.array([list(s)[:dims] for s in spacings if len(s) >= dims], dtype=float) if spacings else None
    return {
        "modalities": [str(m).upper() for m in declared],
        "body_parts": [str(b).upper() for b in data_cfg.body_parts or ()],
        "spatial_dims": dims,
        "spacing_min": arr.min(axis=0).round(6).tolist() if arr is not None and len(arr) else None,
        "spacing_max": arr.max(axis=0).round(6).tolist() if arr is not None and len(arr) else None,
        "intensity": data_cfg.intensity,
        "n_train": len(spacings),
        "extent_min": round(min(min(e[:dims]) for e in extents), 3) if extents else None,
    }


def before_model(study: Study, scope: Scope) -> list[Reason]:
    """The reasons ``study`` is outside ``scope`` that are known before the model runs."""
    reasons: list[Reason] = []
    modality = (study.modality or "OT").upper()
    if scope.modalities and modality != "OT" and modality not in scope.modalities:
        reasons.append(
            Reason(
                code="modality",
                message=f"the study is {modality}; the model was trained on {', '.join(scope.modalities)}",
            )
        )
    body_part = str(study.metadata.get("BodyPartExamined") or "").strip().upper()
    if scope.body_parts and body_part and body_part not in scope.body_parts:
        reasons.append(
            Reason(
                code="body_part",
                message=f"the study is of the {body_part}; the model is meant for {', '.join(scope.body_parts)}",
            )
        )
    if scope.spatial_dims == 2 and not study.is_2d:
        reasons.append(
            Reason(
                code="dimensions",
                message=f"the model is 2D and the study is a volume of {study.spatial_shape[2]} slices",
            )
        )
    if scope.spatial_dims == 3 and study.is_2d:
        reasons.append(
            Reason(code="dimensions", message="the model is 3D and the study is a single slice (a scout or a 2D image)")
        )
    image_type = study.metadata.get("ImageType")
    types = [str(t).upper() for t in image_type] if isinstance(image_type, list) else [str(image_type or "").upper()]
    if "LOCALIZER" in types:
        reasons.append(
            Reason(code="localizer", message="the series is a localizer (ImageType LOCALIZER), not a diagnostic scan")
        )
    if scope.spacing_min and scope.spacing_max and not any(r.code == "dimensions" for r in reasons):
        spacing = study.spacing[: scope.spatial_dims]
        for axis, (s, lo, hi) in enumerate(zip(spacing, scope.spacing_min, scope.spacing_max, strict=False)):
            if s < lo / SPACING_FACTOR or s > hi * SPACING_FACTOR:
                reasons.append(
                    Reason(
                        code="spacing",
                        message=f"voxel spacing {s:.3g} mm along axis {axis} is outside what the model was "
                        f"trained on ({lo:.3g}-{hi:.3g} mm, x{SPACING_FACTOR:g} either way)",
                    )
                )
                break
    if scope.extent_min and not any(r.code == "dimensions" for r in reasons):
        sides = [n * s for n, s in zip(study.spatial_shape, study.spacing, strict=True)][: scope.spatial_dims]
        if min(sides) < scope.extent_min / 2:
            reasons.append(
                Reason(
                    code="field_of_view",
                    message=f"the scan spans only {min(sides):.3g} mm along its shortest side; the smallest "
                    f"training image spans {scope.extent_min:.3g} mm (a slab or a thumbnail, not a whole scan)",
                )
            )
    if study.qc.verdict.value == "reject":
        reasons.append(Reason(code="qc_reject", message="ingestion's QC rejected the series"))
    return reasons


def after_model(coverage: float | None) -> list[Reason]:
    """The reasons known once the prediction is mapped back onto the scan."""
    if coverage is not None and coverage < MIN_COVERAGE:
        return [
            Reason(
                code="field_of_view",
                message=f"the model saw {coverage:.1%} of the scan (less than {MIN_COVERAGE:.0%}); the rest was "
                "not assessed",
            )
        ]
    return []


def manifest_scope(data_cfg: Any) -> dict[str, Any]:
    """:func:`training_scope` of a pipeline's training split, from image headers only (DICOM folder rows,
    whose spacing needs a series load, are left out of the spacing range)."""
    from medhybrid.errors import MedHybridError
    from medhybrid.io.manifest import read_manifest
    from medhybrid.io.readers import image_format, read_geometry
    from medhybrid.io.study import spacing_from_affine

    spacings: list[tuple[float, ...]] = []
    extents: list[tuple[float, ...]] = []
    if data_cfg.spacing is None:  # images are resized, not resampled in mm: their spacing is not a limit
        return training_scope(data_cfg, spacings)
    for row in read_manifest(Path(data_cfg.manifest)).rows:
        if row.split != data_cfg.train_split or not image_format(Path(row.image)):
            continue
        try:
            shape, affine = read_geometry(Path(row.image))
        except MedHybridError:
            continue
        spacings.append(tuple(spacing_from_affine(affine)))
        extents.append(tuple(n * s for n, s in zip(shape, spacings[-1], strict=False)))
    return training_scope(data_cfg, spacings, extents)
