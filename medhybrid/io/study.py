"""The in-memory study: a validated volume, its geometry, safe metadata and a QC verdict.

Geometry convention (used everywhere in medhybrid)
--------------------------------------------------
``Study.array`` is indexed ``[i, j, k]`` (plus a trailing channel axis for colour or 4D data):
``i`` runs along image columns (the DICOM *row* direction cosine), ``j`` along image rows and ``k``
across slices, ordered along the slice normal. A 2D image has ``k`` of length 1.

``Study.affine`` maps a voxel index ``(i, j, k, 1)`` to world millimetres in **RAS+**, the
NIfTI / nibabel / MONAI convention: +x points to the patient's Right, +y Anterior, +z Superior.
DICOM uses LPS+ (+x Left, +y Posterior, +z Head); the DICOM reader builds the LPS affine from
ImagePositionPatient, ImageOrientationPatient and PixelSpacing and converts it with
``RAS = diag(-1, -1, 1, 1) @ LPS``. SimpleITK images are LPS too, and are converted the same way.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
# The RAS affine of a 2D image without patient geometry: DICOM's default axial orientation, 1 mm pixels.
GEOMETRYLESS_2D_AFFINE = LPS_TO_RAS.copy()
# Screen directions (right, down) in RAS for the plane a 2D image lies in, as radiologists display it.
_SCREEN_AXES: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "sagittal": ((0.0, -1.0, 0.0), (0.0, 0.0, -1.0)),  # screen right -> posterior, down -> inferior
    "coronal": ((-1.0, 0.0, 0.0), (0.0, 0.0, -1.0)),  # screen right -> patient left, down -> inferior
    "axial": ((-1.0, 0.0, 0.0), (0.0, -1.0, 0.0)),  # screen right -> patient left, down -> posterior
}

# Metadata that may travel into logs, reports and file names. Everything that identifies a patient
# (name, IDs, birth date, dates of the study, institution, physicians) is deliberately absent.
SAFE_DICOM_KEYWORDS: tuple[str, ...] = (
    "Modality",
    "SOPClassUID",
    "StudyDescription",
    "SeriesDescription",
    "SeriesNumber",
    "BodyPartExamined",
    "Manufacturer",
    "ManufacturerModelName",
    "MagneticFieldStrength",
    "SliceThickness",
    "KVP",
    "ConvolutionKernel",
    "ImageType",
    "PhotometricInterpretation",
    "RescaleType",
)
# Never copied, whatever the whitelist says; the PHI tests look for these.
PHI_KEYWORDS: frozenset[str] = frozenset(
    {"PatientName", "PatientID", "PatientBirthDate", "OtherPatientIDs", "OtherPatientNames"}
)


class Verdict(str, Enum):
    """QC verdict of a series or image, from best to worst."""

    OK = "ok"
    WARN = "warn"
    REJECT = "reject"

    @property
    def rank(self) -> int:
        return ("ok", "warn", "reject").index(self.value)


@dataclass(frozen=True)
class QCReason:
    """One QC finding: its level, a stable machine code, and a message for people."""

    level: Verdict
    code: str
    message: str

    def as_dict(self) -> dict[str, str]:
        return {"level": self.level.value, "code": self.code, "message": self.message}


@dataclass
class QCReport:
    """The QC findings of one series or image; the verdict is the worst level found."""

    reasons: list[QCReason] = field(default_factory=list)

    @property
    def verdict(self) -> Verdict:
        if not self.reasons:
            return Verdict.OK
        return max((r.level for r in self.reasons), key=lambda v: v.rank)

    def add(self, level: Verdict, code: str, message: str) -> None:
        self.reasons.append(QCReason(level, code, message))

    def warn(self, code: str, message: str) -> None:
        self.add(Verdict.WARN, code, message)

    def reject(self, code: str, message: str) -> None:
        self.add(Verdict.REJECT, code, message)

    def as_dict(self) -> dict[str, Any]:
        return {"verdict": self.verdict.value, "reasons": [r.as_dict() for r in self.reasons]}


def spacing_from_affine(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel size in mm along i, j, k: the norms of the affine's first three columns."""
    norms = np.linalg.norm(np.asarray(affine, dtype=float)[:3, :3], axis=0)
    return (float(norms[0]), float(norms[1]), float(norms[2]))


def image_plane(affine: np.ndarray) -> str:
    """``axial``, ``coronal`` or ``sagittal``: the patient plane closest to the image's (i, j) plane."""
    a = np.asarray(affine, dtype=float)[:3, :3]
    normal = np.cross(a[:, 0], a[:, 1])
    return ("sagittal", "coronal", "axial")[int(np.argmax(np.abs(normal)))]


def display_affine(affine: np.ndarray) -> np.ndarray:
    """The 2D display frame of a one-slice image (module docstring): a 4x4 affine from voxel ``(i, j, 0)``
    to display millimetres ``(u, v, 0)``, ``u`` to the screen's right and ``v`` down (the world position
    projected on those directions), with the image's pixel spacing; ``u``/``v`` are the frame's first two
    (positive, "RA") axes.

    Each image axis is mapped to the screen axis it is most aligned with (an oblique slice to the nearest
    one), with the sign of that alignment, so reorienting to the frame's positive axes (MONAI's
    ``Orientation("RA")``) only flips or transposes the pixel array, never resamples it.
    """
    a = np.asarray(affine, dtype=float)[:3, :3]
    right, down = (np.asarray(v) for v in _SCREEN_AXES[image_plane(affine)])
    spacing = np.linalg.norm(a[:, :2], axis=0)
    unit = a[:, :2] / spacing
    align = np.array([[unit[:, 0] @ right, unit[:, 0] @ down], [unit[:, 1] @ right, unit[:, 1] @ down]])
    straight = abs(align[0, 0]) + abs(align[1, 1]) >= abs(align[0, 1]) + abs(align[1, 0])
    out = np.eye(4)
    out[:2, :2] = 0.0
    if straight:  # i along the screen's u, j along v
        out[0, 0] = np.sign(align[0, 0] or 1.0) * spacing[0]
        out[1, 1] = np.sign(align[1, 1] or 1.0) * spacing[1]
    else:  # i along v, j along u (a transposed image)
        out[1, 0] = np.sign(align[0, 1] or 1.0) * spacing[0]
        out[0, 1] = np.sign(align[1, 0] or 1.0) * spacing[1]
    # the image's origin, in screen millimetres: two images of one plane keep their relative position
    origin = np.asarray(affine, dtype=float)[:3, 3]
    out[:2, 3] = (origin @ right, origin @ down)
    return out


def study_key(identity: str) -> str:
    """A stable pseudonymous key: ``s`` + the first 16 hex digits of sha256(identity).

    ``identity`` is the StudyInstanceUID for DICOM and the resolved file path for other formats, so the
    key never contains PHI and is the same on every run for the same input.
    """
    return "s" + hashlib.sha256(identity.encode("utf-8")).hexdigest()[:16]


# The grid every study must have, whatever its format: checked once, here, where every reader's study is made.
SHEAR_TOLERANCE = 1e-2  # |cos| between two voxel axes (about 0.6 degrees from a right angle)
VOXEL_MM_RANGE = (1e-4, 1e5)  # a voxel from 0.1 micrometre to 100 m: outside, the header is wrong


def validate_affine(affine: Any, source: Path | str | None = None) -> np.ndarray:
    """The affine as a float64 4x4 array, or InvalidGeometryError naming ``source``: not finite, voxel sizes
    outside :data:`VOXEL_MM_RANGE`, or axes sheared beyond :data:`SHEAR_TOLERANCE` (resampling, orientation and
    every distance in mm assume a rectangular grid)."""
    from medhybrid.errors import InvalidGeometryError

    matrix = np.asarray(affine, dtype=np.float64)
    fix = "correct the image's header geometry (spacing, orientation), or resample it to an orthogonal grid"
    if matrix.shape != (4, 4) or not np.isfinite(matrix).all():
        raise InvalidGeometryError("the voxel-to-world matrix is not a finite 4x4 matrix", path=source, fix=fix)
    sizes = np.linalg.norm(matrix[:3, :3], axis=0)
    if sizes.min() < VOXEL_MM_RANGE[0] or sizes.max() > VOXEL_MM_RANGE[1]:
        shown = ", ".join(f"{v:.4g}" for v in sizes)
        raise InvalidGeometryError(
            f"voxel sizes ({shown}) mm are outside {VOXEL_MM_RANGE[0]}-{VOXEL_MM_RANGE[1]} mm", path=source, fix=fix
        )
    cosines = matrix[:3, :3] / sizes
    off = np.abs(cosines.T @ cosines - np.eye(3)).max()
    if off > SHEAR_TOLERANCE:
        raise InvalidGeometryError(
            f"the voxel axes are not perpendicular (largest |cos| between two axes {off:.3f}): a sheared grid",
            path=source,
            fix=fix,
        )
    return matrix


@dataclass(eq=False)
class Study:
    """One validated image volume ready for preprocessing.

    Attributes:
        key: pseudonymous study key (see :func:`study_key`).
        array: voxel data, float32, shape ``(I, J, K)`` or ``(I, J, K, C)``; CT in HU after rescale.
        affine: 4x4 voxel-to-RAS matrix (see module docstring).
        modality: DICOM modality (``CT``, ``MR``, ...) or ``OT`` when unknown.
        source: the file or folder the study was read from.
        source_format: ``dicom``, ``nifti``, ``nrrd``, ``mha``, ``png`` or ``medmnist``.
        metadata: whitelisted, PHI-free metadata (:data:`SAFE_DICOM_KEYWORDS`).
        qc: QC findings of the loaded series or image.
        series_uid: the DICOM SeriesInstanceUID, if any.
    """

    key: str
    array: np.ndarray
    affine: np.ndarray
    modality: str
    source: Path
    source_format: str
    metadata: dict[str, Any] = field(default_factory=dict)
    qc: QCReport = field(default_factory=QCReport)
    series_uid: str | None = None

    def __post_init__(self) -> None:
        self.affine = validate_affine(self.affine, self.source)
        if self.array.ndim not in (3, 4):
            raise ValueError(f"array must be (I, J, K) or (I, J, K, C), got shape {self.array.shape}")
        leaked = PHI_KEYWORDS.intersection(self.metadata)
        if leaked:
            raise ValueError(f"PHI keys in study metadata: {sorted(leaked)}")

    @property
    def spacing(self) -> tuple[float, float, float]:
        return spacing_from_affine(self.affine)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.array.shape)

    @property
    def spatial_shape(self) -> tuple[int, int, int]:
        i, j, k = self.array.shape[:3]
        return (int(i), int(j), int(k))

    @property
    def is_2d(self) -> bool:
        return self.array.shape[2] == 1

    def summary(self) -> dict[str, Any]:
        """A JSON-ready, PHI-free description (no voxel data)."""
        return {
            "study_key": self.key,
            "source_format": self.source_format,
            "modality": self.modality,
            "shape": list(self.shape),
            "spacing": [round(s, 6) for s in self.spacing],
            "qc": self.qc.as_dict(),
            "metadata": {k: _jsonable(v) for k, v in self.metadata.items()},
        }


def _jsonable(value: Any) -> Any:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return str(value)
