"""The per-study report (``report.json``): its schema as pydantic models, and the lesion measurements.

The schema is documented in ``docs/report-schema.md``, which embeds the JSON Schema generated from
:class:`StudyReport` (a test checks the two agree). ``schema_version`` changes when a field changes
meaning or disappears; new optional fields do not change it.
"""

from __future__ import annotations

import json
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from scipy import ndimage

SCHEMA_VERSION = "2.2"  # 2.0: probability/decision/operating_point may be null; structures; run_key
# 2.1: output_errors (an output that could not be written), outputs.sha256 (what a rerun verifies)
# 2.2: decision "not_assessed" and assessment (the model's scope: medhybrid/infer/scope.py)


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelInfo(_Model):
    name: str = Field(description="registered model name, e.g. hybrid_r18_3d")
    weights_sha256: str = Field(
        description="SHA-256 of the weights (the model's tensors; for an ensemble, of its members' digests)"
    )
    checkpoint: str = Field(description="file name of the checkpoint (ensemble.json for a cross-validation ensemble)")
    task: str = Field(description="classification, segmentation or multitask")
    medhybrid_version: str
    temperature: float = Field(
        1.0, description="temperature dividing the logits (fitted by `medhybrid evaluate`; 1 = uncalibrated)"
    )


class OperatingPoint(_Model):
    threshold: float = Field(description="a study is called abnormal when probability >= threshold")
    method: str = Field(description="how the threshold was chosen: youden, min_sensitivity=..., fixed, ...")
    sensitivity: float | None = Field(None, description="on the validation set it was chosen on")
    specificity: float | None = None
    n_abnormal: int | None = None
    n_normal: int | None = None


class Lesion(_Model):
    """A mask label of kind ``lesion`` (an abnormality)."""

    label: int = Field(description="value in mask.nii.gz")
    name: str
    volume_ml: float = Field(description="voxel count x voxel volume in the scan's own geometry, in mL")
    components: int = Field(description="connected components (26-connected in 3D, 8 in 2D)")
    voxels: int
    largest_component_ml: float


class Structure(Lesion):
    """A mask label of kind ``anatomy`` (a normal structure, e.g. the hippocampus): measured, never a finding."""


class ScopeReason(_Model):
    code: str = Field(description="modality, body_part, dimensions, localizer, spacing, field_of_view, qc_reject")
    message: str


class Assessment(_Model):
    assessed: bool = Field(description="false: the study is outside the model's scope and got no verdict")
    forced: bool = Field(False, description="assessed although outside the scope (--force)")
    reasons: list[ScopeReason] = Field([], description="why the study is outside the model's scope")


class QCFlag(_Model):
    level: Literal["ok", "warn", "reject"]
    code: str
    message: str


class Source(_Model):
    format: str = Field(description="dicom, nifti, nrrd, mha or png")
    path: str = Field(description="the study's file or folder, relative to the input when inside it")
    modality: str
    shape: list[int] = Field(description="voxels along i, j, k (and channels)")
    spacing_mm: list[float]
    series_uid: str | None = None
    description: str | None = Field(None, description="SeriesDescription (DICOM)")
    manifest_id: str | None = Field(None, description="study_id when the input is a manifest")


class Saliency(_Model):
    method: Literal["gradcam", "attention"]
    file: str
    description: str


class Outputs(_Model):
    mask: str | None = Field(None, description="label map in the input's geometry (NIfTI)")
    saliency: list[Saliency] = []
    dicom_seg: str | None = None
    dicom_sr: str | None = None
    html: str = "report.html"
    thumbnail: str = "thumb.png"
    sha256: dict[str, str] = Field(
        {}, description="SHA-256 of every file above (report.json excepted): a rerun redoes a study whose files differ"
    )

    def files(self) -> list[str]:
        """The study folder's files this report lists."""
        listed = [self.mask, *(s.file for s in self.saliency), self.dicom_seg, self.dicom_sr, self.html, self.thumbnail]
        return [f for f in listed if f]


class OutputError(_Model):
    output: str = Field(description="the output that could not be written: dicom_seg, dicom_sr, ...")
    code: str = Field(description="error code (medhybrid.errors) or exception type")
    reason: str


class StudyReport(_Model):
    """``report.json``: everything ``medhybrid infer`` concluded about one study."""

    schema_version: str = SCHEMA_VERSION
    study_key: str = Field(description="pseudonymous key: s + 16 hex digits of sha256(StudyInstanceUID or path)")
    status: Literal["ok"] = "ok"
    probability: float | None = Field(
        ge=0.0,
        le=1.0,
        description="the study's score (see score_method): probability of abnormality 1 - p(normal class) for a "
        "classifier, the lesion score of a segmentation-only lesion model; null when the model gives no verdict "
        "(segmentation of anatomy only)",
    )
    score_method: str | None = Field(
        None, description="classifier, or how a segmentation-only model's lesion score is defined; null: no score"
    )
    decision: Literal["abnormal", "normal", "not_assessed"] | None = Field(
        description="null when the model gives no verdict (anatomy); not_assessed when the study is outside the "
        "model's scope (see assessment): never normal then"
    )
    assessment: Assessment = Field(Assessment(assessed=True), description="the model's scope applied to the study")
    operating_point: OperatingPoint | None
    class_probabilities: dict[str, float] | None = Field(None, description="per class name; None without a classifier")
    lesions: list[Lesion] = Field(description="per lesion mask class; empty without a segmentation output")
    structures: list[Structure] = Field(
        [], description="per anatomy mask class (normal structures): volumes, never a finding"
    )
    qc: list[QCFlag] = Field(description="ingestion QC findings plus inference's own (e.g. no operating point)")
    qc_verdict: Literal["ok", "warn", "reject"]
    model: ModelInfo
    source: Source
    outputs: Outputs
    output_errors: list[OutputError] = Field(
        [], description="outputs that could not be written; every other file of the study is complete"
    )
    timings_s: dict[str, float] = Field(description="load, preprocess, model, resample, write, total")
    tta: bool
    created_by: str = "medhybrid infer"
    patient: dict[str, str] | None = Field(None, description="PatientName/ID/BirthDate, only with --include-phi")
    run_key: str = Field(
        "",
        description="digest of what decided this report (weights, temperature, threshold, TTA, mask kinds, output "
        "options, medhybrid version): a rerun into the same folder redoes the study when it differs",
    )

    def to_json(self) -> bytes:
        return (json.dumps(self.model_dump(mode="json"), indent=2, allow_nan=False) + "\n").encode()


def schema_markdown() -> str:
    """The JSON Schema of :class:`StudyReport`, pretty-printed (embedded in docs/report-schema.md)."""
    return json.dumps(StudyReport.model_json_schema(), indent=2, sort_keys=True)


def measure_lesions(labels: np.ndarray, spacing: tuple[float, float, float], names: dict[int, str]) -> list[Lesion]:
    """Volume (mL) and connected components per foreground class of a native-geometry label map (every
    class named in ``names`` except 0, as :class:`Lesion`; the caller sorts them into lesions and structures).

    Components are counted with ``scipy.ndimage.label`` inside the class's bounding box (so a small
    lesion in a large scan labels a small array), with full connectivity.
    """
    voxel_ml = float(np.prod(spacing)) / 1000.0
    out: list[Lesion] = []
    for label in sorted(k for k in names if k != 0):
        where = labels == label
        count = int(np.count_nonzero(where))
        components, largest = 0, 0
        if count:
            box = ndimage.find_objects(where.view(np.uint8))[0]
            crop = where[box]
            if crop.shape[2] == 1:  # 2D: 8-connected
                crop = crop[:, :, 0]
            full = ndimage.generate_binary_structure(crop.ndim, crop.ndim)
            lab, components = ndimage.label(crop, structure=full)
            largest = int(np.bincount(lab.ravel())[1:].max())
        out.append(
            Lesion(
                label=label,
                name=names.get(label, f"class {label}"),
                volume_ml=round(count * voxel_ml, 4),
                components=int(components),
                voxels=count,
                largest_component_ml=round(largest * voxel_ml, 4),
            )
        )
    return out


def jsonable(value: Any) -> Any:
    """Floats rounded for reports; NaN becomes None (JSON has no NaN)."""
    if isinstance(value, float):
        return None if np.isnan(value) else round(value, 6)
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


def update_schema_doc(path: str = "docs/report-schema.md") -> None:
    """Rewrite the JSON Schema block of the schema document (between its ``json`` fence markers)."""
    from pathlib import Path

    doc = Path(path)
    text = doc.read_text(encoding="utf-8")
    begin, end = "<!-- schema:begin -->\n```json\n", "\n```\n<!-- schema:end -->"
    head, _, rest = text.partition(begin)
    _, _, tail = rest.partition(end)
    doc.write_text(head + begin + schema_markdown() + end + tail, encoding="utf-8")


if __name__ == "__main__":
    update_schema_doc()
