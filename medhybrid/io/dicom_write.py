"""Write a volume as a DICOM series that :mod:`medhybrid.io.dicom` reads back exactly.

One single-frame CT (or MR) Image Storage file per slice, Explicit VR Little Endian, with a File Meta
header, 16-bit unsigned stored values and RescaleSlope/Intercept. The output is deterministic: the same
inputs give byte-identical files (UIDs are derived from the caller's UIDs; no clock is read).

Geometry (see :mod:`medhybrid.io.study`): the RAS affine is converted to LPS; its column 0 gives the
row direction cosine and the spacing between columns, column 1 the column direction cosine and the
spacing between rows, and column 2 the step from one slice's ImagePositionPatient to the next.

The reader orders slices along ``normal = cross(row_dir, col_dir)`` (LPS). For the affine to come back
unchanged, column 2 must point along that normal, i.e. the LPS affine's 3x3 part has a positive
determinant (the usual case: RAS ``diag(-sx, -sy, sz)`` for axial images). An affine whose column 2 points
against the normal is written as given, but reads back with the slices (and column 2) reversed: the
same voxels in the same places, indexed the other way along k. A column 2 that is not (anti)parallel to
the normal (a sheared stack) is refused, since the reader would reject it as gantry tilt.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import dcmwrite
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid
from pydicom.valuerep import format_number_as_ds

from medhybrid.io.study import LPS_TO_RAS
from medhybrid.io.writers import atomic_write_bytes

logger = logging.getLogger(__name__)

SOP_CLASSES = {
    "CT": "1.2.840.10008.5.1.4.1.1.2",  # CT Image Storage
    "MR": "1.2.840.10008.5.1.4.1.1.4",  # MR Image Storage
}
FIXED_TIME = "120000"
_UINT16_MAX = 65535


def derive_uid(*parts: str, prefix: str | None = None) -> str:
    """A deterministic DICOM UID from strings (``pydicom.uid.generate_uid`` with ``entropy_srcs``).

    Args:
        parts: the strings the UID is derived from; the same parts always give the same UID.
        prefix: UID root ending in ``.``; ``None`` uses pydicom's root.
    """
    if not parts:
        raise ValueError("derive_uid needs at least one string to derive the UID from")
    if prefix is None:
        return str(generate_uid(entropy_srcs=[str(p) for p in parts]))
    return str(generate_uid(prefix=prefix, entropy_srcs=[str(p) for p in parts]))


def format_ds(value: float) -> str:
    """A DS string of at most 16 characters that round-trips binary-exact values (no ``-0``)."""
    value = float(value)
    if abs(value) < 1e-13:  # numerical dust from cos(90 deg) etc.
        value = 0.0
    return format_number_as_ds(value + 0.0)


def plane_geometry(affine: np.ndarray) -> dict[str, Any]:
    """DICOM plane geometry of a voxel-to-RAS affine.

    Args:
        affine: 4x4 voxel ``(i=column, j=row, k=slice)`` to RAS mm.

    Returns:
        ``row_dir``, ``col_dir`` (unit LPS direction cosines, shape (3,)), ``pixel_spacing``
        ``(between rows, between columns)``, ``slice_step`` (LPS vector, shape (3,)), ``slice_mm``,
        ``origin`` (LPS position of voxel (0, 0, 0), shape (3,)) and ``normal`` (unit, shape (3,)).

    Raises:
        ValueError: the affine is not finite, or its first two columns are zero or not orthogonal.
    """
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
        raise ValueError(f"affine must be a finite 4x4 matrix, got {affine.tolist()}")
    lps = LPS_TO_RAS @ affine  # diag(-1, -1, 1, 1) is its own inverse
    col_mm = float(np.linalg.norm(lps[:3, 0]))
    row_mm = float(np.linalg.norm(lps[:3, 1]))
    slice_mm = float(np.linalg.norm(lps[:3, 2]))
    if not (col_mm > 0 and row_mm > 0 and slice_mm > 0):
        raise ValueError(f"affine has a zero-length axis: {affine.tolist()}")
    row_dir, col_dir = lps[:3, 0] / col_mm, lps[:3, 1] / row_mm
    if abs(float(row_dir @ col_dir)) > 1e-6:
        raise ValueError("affine columns 0 and 1 are not orthogonal; DICOM pixels are rectangular")
    normal = np.cross(row_dir, col_dir)
    return {
        "row_dir": row_dir,
        "col_dir": col_dir,
        "pixel_spacing": (row_mm, col_mm),
        "slice_step": lps[:3, 2].copy(),
        "slice_mm": slice_mm,
        "origin": lps[:3, 3].copy(),
        "normal": normal,
    }


def write_dicom_series(
    volume: np.ndarray,
    affine: np.ndarray,
    out_dir: Path,
    *,
    modality: str = "CT",
    study_uid: str,
    series_uid: str,
    series_number: int = 1,
    series_description: str = "",
    patient_name: str = "",
    patient_id: str = "",
    patient_birth_date: str = "",
    study_date: str = "20240101",
    uid_prefix: str | None = None,
    rescale_intercept: float = -1024.0,
    rescale_slope: float = 1.0,
    file_prefix: str = "IM",
    extra: Mapping[str, Any] | None = None,
) -> list[Path]:
    """Write ``volume`` as one single-frame DICOM file per k-slice in ``out_dir``.

    Stored values are ``round((value - rescale_intercept) / rescale_slope)`` clipped to uint16 (a
    warning is logged when values are clipped); pixel (row r, column c) of slice k is
    ``volume[c, r, k]``. Files are named ``{file_prefix}{k + 1:04d}.dcm`` and written atomically (temp
    file + ``os.replace``); files already in ``out_dir`` under other names are left alone.

    Args:
        volume: voxel values (HU for CT), shape ``(I, J, K)`` or ``(I, J)`` for one slice.
        affine: 4x4 voxel-to-RAS matrix (see the module docstring for the k-axis convention).
        out_dir: folder to write into (created if needed).
        study_uid, series_uid: StudyInstanceUID and SeriesInstanceUID. SOPInstanceUIDs and the
            FrameOfReferenceUID are derived from ``series_uid`` (see :func:`derive_uid`).
        uid_prefix: UID root for the derived UIDs (``None``: pydicom's root).
        patient_name, patient_id, patient_birth_date, study_date: written as given (``YYYYMMDD`` dates).
        extra: further attributes by keyword (e.g. ``{"PatientSex": "F"}``), set on every slice last.

    Returns:
        The written files, in k order.

    Raises:
        ValueError: bad volume, affine, modality, rescale or ``extra`` keyword.
    """
    modality = modality.upper()
    if modality not in SOP_CLASSES:
        raise ValueError(f"modality must be one of {sorted(SOP_CLASSES)}, got {modality!r}")
    vol = np.asarray(volume, dtype=np.float64)
    if vol.ndim == 2:
        vol = vol[:, :, np.newaxis]
    if vol.ndim != 3 or min(vol.shape) < 1:
        raise ValueError(f"volume must have shape (I, J, K) or (I, J), got {np.shape(volume)}")
    if vol.shape[0] > _UINT16_MAX or vol.shape[1] > _UINT16_MAX:
        raise ValueError(f"volume slices {vol.shape[:2]} are too large for DICOM Rows/Columns")
    if not np.all(np.isfinite(vol)):
        raise ValueError("volume holds NaN or infinity")
    if not (np.isfinite(rescale_slope) and rescale_slope > 0 and np.isfinite(rescale_intercept)):
        raise ValueError(f"rescale slope must be > 0 and intercept finite, got {rescale_slope}, {rescale_intercept}")
    for keyword in extra or {}:
        if tag_for_keyword(keyword) is None:
            raise ValueError(f"extra: {keyword!r} is not a DICOM keyword")
    geo = plane_geometry(affine)
    n_slices = vol.shape[2]
    if n_slices > 1:
        cos = float(geo["slice_step"] @ geo["normal"]) / geo["slice_mm"]
        if abs(cos) < 1 - 1e-9:
            raise ValueError(
                "affine column 2 is not along the slice normal (sheared stack); the DICOM reader would "
                "reject it as gantry tilt"
            )
        if cos < 0:
            logger.debug("affine column 2 points against the slice normal: reads back with k reversed")

    stored = np.rint((vol - rescale_intercept) / rescale_slope)
    clipped = int(np.count_nonzero((stored < 0) | (stored > _UINT16_MAX)))
    if clipped:
        logger.warning("%d voxel(s) outside the storable range were clipped (%s)", clipped, out_dir)
    stored = np.clip(stored, 0, _UINT16_MAX).astype("<u2")

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    base = _base_dataset(
        modality=modality,
        study_uid=study_uid,
        series_uid=series_uid,
        frame_uid=derive_uid(series_uid, "frame-of-reference", prefix=uid_prefix),
        series_number=series_number,
        series_description=series_description,
        patient_name=patient_name,
        patient_id=patient_id,
        patient_birth_date=patient_birth_date,
        study_date=study_date,
        rows=vol.shape[1],
        cols=vol.shape[0],
        geo=geo,
        rescale_intercept=rescale_intercept,
        rescale_slope=rescale_slope,
    )
    width = max(4, len(str(n_slices)))
    paths = []
    for k in range(n_slices):
        ds = Dataset()
        ds.update(base)
        sop_uid = derive_uid(series_uid, "instance", str(k), prefix=uid_prefix)
        ds.SOPInstanceUID = sop_uid
        ds.InstanceNumber = k + 1
        position = geo["origin"] + k * geo["slice_step"]
        ds.ImagePositionPatient = [format_ds(v) for v in position]
        ds.SliceLocation = format_ds(float(position @ geo["normal"]))
        ds.add_new(0x7FE00010, "OW", np.ascontiguousarray(stored[:, :, k].T).tobytes())
        for keyword, value in (extra or {}).items():
            setattr(ds, keyword, value)
        ds.file_meta = _file_meta(SOP_CLASSES[modality], sop_uid)
        path = out_dir / f"{file_prefix}{k + 1:0{width}d}.dcm"
        _write_atomic(path, ds)
        paths.append(path)
    logger.debug("wrote %d DICOM slice(s) to %s", n_slices, out_dir)
    return paths


def _base_dataset(
    *,
    modality: str,
    study_uid: str,
    series_uid: str,
    frame_uid: str,
    series_number: int,
    series_description: str,
    patient_name: str,
    patient_id: str,
    patient_birth_date: str,
    study_date: str,
    rows: int,
    cols: int,
    geo: dict[str, Any],
    rescale_intercept: float,
    rescale_slope: float,
) -> Dataset:
    """The attributes every slice shares (all but SOPInstanceUID, InstanceNumber, position, pixels)."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"] if modality == "CT" else ["ORIGINAL", "PRIMARY"]
    ds.SOPClassUID = SOP_CLASSES[modality]
    ds.StudyDate = study_date
    ds.SeriesDate = study_date
    ds.ContentDate = study_date
    ds.StudyTime = FIXED_TIME
    ds.SeriesTime = FIXED_TIME
    ds.ContentTime = FIXED_TIME
    ds.AccessionNumber = ""
    ds.Modality = modality
    ds.Manufacturer = "medhybrid"
    ds.ReferringPhysicianName = ""
    ds.SeriesDescription = series_description
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = patient_birth_date
    ds.PatientSex = ""
    if modality == "CT":
        ds.KVP = "120"
    else:
        ds.ScanningSequence = "SE"
        ds.SequenceVariant = "NONE"
        ds.ScanOptions = ""
        ds.MRAcquisitionType = ""
        ds.RepetitionTime = ""
        ds.EchoTime = ""
        ds.EchoTrainLength = ""
    ds.SliceThickness = format_ds(geo["slice_mm"])
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = "1"
    ds.SeriesNumber = int(series_number)
    ds.AcquisitionNumber = 1
    ds.ImageOrientationPatient = [format_ds(v) for v in (*geo["row_dir"], *geo["col_dir"])]
    ds.FrameOfReferenceUID = frame_uid
    ds.PositionReferenceIndicator = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = int(rows)
    ds.Columns = int(cols)
    ds.PixelSpacing = [format_ds(v) for v in geo["pixel_spacing"]]
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    if modality == "CT":
        ds.WindowCenter = "40"
        ds.WindowWidth = "400"
    ds.RescaleIntercept = format_ds(rescale_intercept)
    ds.RescaleSlope = format_ds(rescale_slope)
    ds.RescaleType = "HU" if modality == "CT" else "US"
    return ds


def _file_meta(sop_class: str, sop_uid: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return meta


def _write_atomic(path: Path, ds: Dataset) -> None:
    """Encode ``ds`` as a DICOM Part 10 file (preamble, DICM, File Meta) and move it into place."""
    buffer = io.BytesIO()
    dcmwrite(buffer, ds, enforce_file_format=True)
    atomic_write_bytes(path, buffer.getvalue())
