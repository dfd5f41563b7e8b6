"""DICOM outputs of an inference run: a DICOM SEG of the mask and a Comprehensive 3D SR report.

Both objects are built with highdicom, belong to the source study, share its Frame of Reference and are
written atomically (serialised into memory, then :func:`~medhybrid.io.writers.atomic_write_bytes`).

Geometry
--------
The mask is a volume in the source series' own geometry (see :mod:`medhybrid.io.study`): indexed
``[i, j, k]`` with ``i`` = image column, ``j`` = image row and ``k`` = index into the series' sorted
``headers``. The SEG frame of slice ``k`` is ``mask[:, :, k].T`` and references the source instance (or,
for an Enhanced / multi-frame source, the source *frame* ``headers[k].frame``) it was derived from, with
the source slice's ImagePositionPatient, ImageOrientationPatient and PixelSpacing.

SEG content
-----------
A BINARY segmentation with one segment per foreground label named in ``segment_names`` (label 0 is the
background and never a segment). Segment numbers are 1..N in ascending label order; each segment carries
the label's name as SegmentLabel, TrackingID ``"<name> (mask label <label>)"`` and a deterministic
TrackingUID, a category and type from the label's kind (``segment_kinds``, see
:mod:`medhybrid.evaluate.study_score`), and the algorithm in its SegmentationAlgorithmIdentificationSequence:

* ``lesion``: category Morphologically Abnormal Structure, type coded from the name (lesion, nodule, mass,
  tumour/neoplasm; anything else is coded as Lesion);
* ``anatomy``: category Anatomical Structure, type the segmentation property type (CID 7151) whose name
  the label has (e.g. "Hippocampus", "Liver"), or Anatomical Structure itself when none has that name
  (e.g. the MSD hippocampus labels "Anterior", "Posterior", which are direction qualifiers, not structures).

Frames that hold no voxel of a segment are omitted (highdicom's ``omit_empty_frames``), so a segment whose
label is absent from a non-empty mask has no frames, which readers reconstruct as empty. An all-empty
mask is written with every frame of every segment present (and empty), so that the SEG still covers the
whole source series and reads back as an empty mask of the right shape.

SR content
----------
A TID 1500 Imaging Measurement Report (Comprehensive 3D SR) observed by the algorithm as a device:

* when the model gives a verdict, one TID 1501 measurement group ("study classification") with the
  study's score (DCM 122157 *Probability* for a classifier, SCT 246262008 *Score* for a segmentation-only
  model's lesion score, which is not a probability; UCUM ``1``) and the decision as a qualitative evaluation
  (DCM 121402 *Normality* = SCT *Abnormal* / *Normal*); the operating point and the weights' sha256 are
  recorded as algorithm parameters (TID 4019). A model of anatomy only gives no verdict, and the SR then
  has no such group: it never calls a scan normal or abnormal on the strength of a normal structure;
* with a SEG, one TID 1411 volumetric ROI group per segmented class, referencing the class' SEG segment
  and reporting its volume (SCT 118565006 *Volume*, UCUM ``mL``), with the category and type of the SEG
  segment; lesion classes also report their number of connected components (SCT 246206008 *Number of
  lesions*, UCUM ``1``). The group reuses the segment's TrackingUID.

Numbers are rounded before they are written: the probability to 6 decimals and volumes to 3 decimals
(1 uL); both the DS (NumericValue) and the FD (FloatingPointValue) of an item hold the rounded value.

UIDs
----
All UIDs are derived with :func:`~medhybrid.io.dicom_write.derive_uid`, never drawn at random: series
UIDs from ``(source series UID, weights sha256, "seg"|"sr", "series")``, instance UIDs additionally from a
digest of the content (mask, segment names, findings, PHI setting), so a rerun with the same inputs
writes the same UIDs while a changed result never reuses an instance UID. Tracking UIDs depend on the
source series, the weights and the label only, so the same ROI keeps its identity across reruns.

PHI
---
With ``include_phi=False`` (the default) highdicom only ever sees copies of the source headers from which
the patient's identity has been removed: PatientName, PatientID, PatientBirthDate, AccessionNumber, StudyID
and ReferringPhysicianName are written empty (type 2; StudyID is a site-assigned number that is often
the accession number or even the patient ID), and other identifying attributes (other patient IDs or
names, address, telephone, birth name/time, comments, institution and staff names, ...) are dropped
wherever they occur, nested sequences included. Sex, age, size and weight, the study date and the UIDs are
kept. With ``include_phi=True`` patient and study information is copied from the source as highdicom does,
which is what a PACS needs to file the objects with the study.
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence as DicomSequence
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.tag import BaseTag

from medhybrid.errors import ConfigError, DicomError, InputError, NotDicomError, TruncatedFileError
from medhybrid.io.dicom_files import SliceHeader, recorded_warnings, sniff_dicom
from medhybrid.io.dicom_write import derive_uid
from medhybrid.io.writers import atomic_write_bytes

logger = logging.getLogger(__name__)

MANUFACTURER = "medhybrid"
SEG_LABEL = "MEDHYBRID SEG"
SR_LABEL = "MEDHYBRID SR"
SEG_SERIES_NUMBER = 9101
SR_SERIES_NUMBER = 9102
PROBABILITY_DECIMALS = 6
VOLUME_DECIMALS = 3

# UCUM unit expression for millilitre (pydicom's code dictionary has no entry for it)
MILLILITER = Code("mL", "UCUM", "milliliter")

DECISIONS = ("abnormal", "normal")

# Segmented property type by (lower-case) segment name; anything else is coded as Lesion.
_PROPERTY_TYPES: dict[str, Code] = {
    "lesion": codes.SCT.Lesion,
    "lesions": codes.SCT.Lesion,
    "nodule": codes.SCT.Nodule,
    "nodules": codes.SCT.Nodule,
    "mass": codes.SCT.Mass,
    "tumor": codes.SCT.Neoplasm,
    "tumour": codes.SCT.Neoplasm,
    "neoplasm": codes.SCT.Neoplasm,
}

# Recommended display colours (CIELab) for segments 1, 2, ...: red, green, blue, yellow, cyan, magenta.
_PALETTE: tuple[tuple[float, float, float], ...] = (
    (53.24, 80.09, 67.20),
    (87.73, -86.18, 83.18),
    (32.30, 79.19, -107.86),
    (97.14, -21.55, 94.48),
    (91.11, -48.09, -14.13),
    (60.32, 98.23, -60.82),
)

# Type 2 identity attributes: kept (they are required) but written empty without include_phi.
_BLANKED_KEYWORDS: tuple[str, ...] = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "AccessionNumber",
    "StudyID",
    "ReferringPhysicianName",
)
# Identifying attributes dropped wherever they occur (nested sequences included) without include_phi.
_DROPPED_KEYWORDS: tuple[str, ...] = (
    "OtherPatientIDs",
    "OtherPatientNames",
    "OtherPatientIDsSequence",
    "IssuerOfPatientID",
    "IssuerOfPatientIDQualifiersSequence",
    "TypeOfPatientID",
    "PatientBirthName",
    "PatientMotherBirthName",
    "PatientBirthTime",
    "PatientAddress",
    "PatientTelephoneNumbers",
    "PatientTelecomInformation",
    "MedicalRecordLocator",
    "PatientComments",
    "PatientReligiousPreference",
    "MilitaryRank",
    "BranchOfService",
    "CountryOfResidence",
    "RegionOfResidence",
    "EthnicGroup",
    "Occupation",
    "AdditionalPatientHistory",
    "AdmittingDiagnosesDescription",
    "PatientInsurancePlanCodeSequence",
    "PatientPrimaryLanguageCodeSequence",
    "ResponsiblePerson",
    "ResponsiblePersonRole",
    "ResponsibleOrganization",
    "PatientAlternativeCalendar",
    "PatientBirthDateInAlternativeCalendar",
    "PatientDeathDateInAlternativeCalendar",
    "ReferencedPatientSequence",
    "ReferencedPatientPhotoSequence",
    "ReferringPhysicianAddress",
    "ReferringPhysicianTelephoneNumbers",
    "ReferringPhysicianIdentificationSequence",
    "ConsultingPhysicianName",
    "ConsultingPhysicianIdentificationSequence",
    "PhysiciansOfRecord",
    "PhysiciansOfRecordIdentificationSequence",
    "PerformingPhysicianName",
    "PerformingPhysicianIdentificationSequence",
    "NameOfPhysiciansReadingStudy",
    "PhysiciansReadingStudyIdentificationSequence",
    "RequestingPhysician",
    "OperatorsName",
    "OperatorIdentificationSequence",
    "InstitutionName",
    "InstitutionAddress",
    "InstitutionalDepartmentName",
    "InstitutionCodeSequence",
    "StationName",
)
# Attributes highdicom reads unconditionally from the first source (type 2 in the source IODs too, but
# absent from some files): added empty to the copy handed to highdicom when missing.
_REQUIRED_TYPE2: tuple[str, ...] = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
)


def _tags(keywords: Sequence[str]) -> frozenset[BaseTag]:
    tags = set()
    for keyword in keywords:
        tag = tag_for_keyword(keyword)
        if tag is None:  # a typo in the lists above fails at import
            raise ValueError(f"{keyword!r} is not a DICOM keyword")
        tags.add(BaseTag(tag))
    return frozenset(tags)


_BLANKED_TAGS = _tags(_BLANKED_KEYWORDS)
_DROPPED_TAGS = _tags(_DROPPED_KEYWORDS)

# What highdicom raises on inputs it cannot use (it has no exception hierarchy of its own).
_HIGHDICOM_ERRORS = (ValueError, TypeError, AttributeError, KeyError, IndexError, NotImplementedError)


@dataclass(frozen=True)
class AlgorithmInfo:
    """The model that produced the outputs.

    Attributes:
        name: e.g. ``"medhybrid hybrid_r18_3d"``.
        version: medhybrid version and short weights sha, e.g. ``"0.1.0+3fa2b1c4"``.
        weights_sha256: sha256 of the weights file (hex).
    """

    name: str
    version: str
    weights_sha256: str


@dataclass(frozen=True)
class SegmentFinding:
    """One segmented class of the mask.

    Attributes:
        label: the mask value of the class.
        name: e.g. ``"lesion"``; matches the name given to :func:`write_seg`.
        volume_ml: total volume of the class in mL.
        components: number of connected components of the class.
        kind: ``lesion`` or ``anatomy`` (as given to :func:`write_seg`).
    """

    label: int
    name: str
    volume_ml: float
    components: int
    kind: str = "lesion"


@dataclass(frozen=True)
class Findings:
    """What the SR reports.

    Attributes:
        probability: the study's score, 0..1 (None: the model gives no verdict).
        decision: ``"abnormal"`` or ``"normal"`` (None: no verdict).
        threshold: operating point the decision was taken at (None: no verdict).
        segments: one entry per segmented class (reported only together with a SEG).
        is_probability: the score is a probability of abnormality (a classifier's), coded as DCM
            *Probability*; a segmentation-only model's lesion score is not, and is coded as SCT *Score*.
    """

    probability: float | None
    decision: str | None
    threshold: float | None
    segments: tuple[SegmentFinding, ...]
    is_probability: bool = True


# --- sources -----------------------------------------------------------------------------------------


def source_datasets(headers: Sequence[SliceHeader]) -> list[Dataset]:
    """The source instances in k order, one per distinct file, read without pixel data.

    Raises:
        InputError: no headers.
        NotDicomError, TruncatedFileError: a file can no longer be parsed.
        DicomError: a file no longer holds the instance its header was read from.
    """
    if not headers:
        raise InputError("no slice headers: the series is empty", fix="pass the headers of a loaded series")
    first_by_path: dict[Path, SliceHeader] = {}
    for h in headers:
        first_by_path.setdefault(h.path, h)
    out = []
    for path, header in first_by_path.items():
        ds = _read_header(path)
        if str(ds.get("SOPInstanceUID", "")) != header.sop_uid:
            raise DicomError(
                f"file holds SOPInstanceUID {ds.get('SOPInstanceUID', '')!r}, but the series was read with "
                f"{header.sop_uid!r}",
                path=path,
                fix="the file changed since the series was discovered: load the series again",
            )
        tolerate_charset(ds)
        out.append(ds)
    return out


def tolerate_charset(ds: Dataset) -> None:
    """Repair the Specific Character Set defects real scanners send, as PS3.3 C.12.1.1.2 reads them: an empty
    value (Hitachi CT, among others) means the default repertoire, so the element is dropped; an empty first
    value of a multi-valued set means the default repertoire with code extensions (ISO 2022 IR 6). highdicom
    copies the element into SEG/SR and refuses the empty string otherwise."""
    if "SpecificCharacterSet" not in ds:
        return
    value = ds.SpecificCharacterSet
    values = [str(v).strip() for v in (value if isinstance(value, MultiValue) else [value])]
    if not any(values):
        del ds.SpecificCharacterSet
    elif not values[0]:
        ds.SpecificCharacterSet = ["ISO 2022 IR 6", *values[1:]]


def _read_header(path: Path) -> Dataset:
    """Parse ``path`` up to (not including) its pixel data, with typed errors."""
    with recorded_warnings():
        try:
            return pydicom.dcmread(path, stop_before_pixels=True, force=sniff_dicom(path) == "maybe")
        except (EOFError, OSError) as exc:
            raise TruncatedFileError(f"cannot read the file ({exc})", path=path, fix="re-copy the file") from None
        except Exception as exc:  # pydicom raises many types on garbage
            raise NotDicomError(
                f"cannot be parsed as DICOM ({type(exc).__name__}: {exc})",
                path=path,
                fix="re-export the series as DICOM Part 10",
            ) from None


def _check_sources(headers: Sequence[SliceHeader], sources: Sequence[Dataset]) -> None:
    """``sources`` must be :func:`source_datasets` of ``headers``: one per file, in k order."""
    first_by_path: dict[Path, str] = {}
    for h in headers:
        first_by_path.setdefault(h.path, h.sop_uid)
    expected = list(first_by_path.values())
    got = [str(ds.get("SOPInstanceUID", "")) for ds in sources]
    if got != expected:
        raise DicomError(
            f"the {len(got)} source dataset(s) given are not the {len(expected)} instance(s) of the series in k order",
            path=headers[0].path.parent,
            fix="pass sources=source_datasets(headers), or leave sources out",
        )


def _check_headers(headers: Sequence[SliceHeader]) -> None:
    if not headers:
        raise InputError("no slice headers: the series is empty", fix="pass the headers of a loaded series")
    first = headers[0]
    series = {h.series_uid for h in headers}
    if len(series) > 1:
        raise DicomError(
            f"headers belong to {len(series)} series",
            path=first.path.parent,
            fix="pass the headers of one series (DicomSeries.headers)",
        )
    if any((h.rows, h.cols) != (first.rows, first.cols) for h in headers):
        raise DicomError(
            "slices of the series differ in size",
            path=first.path.parent,
            fix="pass the headers of a series that passed its geometry checks",
        )


# --- PHI -----------------------------------------------------------------------------------------------


def _prepared_source(ds: Dataset, include_phi: bool) -> Dataset:
    """The copy of a source header handed to highdicom: identity removed unless ``include_phi``, missing
    type 2 attributes added empty. ``ds`` itself is never modified."""
    out = _clean_copy(ds, scrub=not include_phi)
    for keyword in _REQUIRED_TYPE2:
        if keyword not in out:
            tag = tag_for_keyword(keyword)
            assert tag is not None
            out.add(DataElement(tag, dictionary_VR(tag), ""))
    if hasattr(ds, "file_meta"):
        out.file_meta = ds.file_meta
    return out


def _clean_copy(ds: Dataset, *, scrub: bool, nested: bool = False) -> Dataset:
    """A copy of ``ds`` whose sequences are copied too (so that editing the copy never edits ``ds``);
    with ``scrub``, identity attributes are dropped, and at the top level the type 2 ones emptied.

    Elements pydicom has not decoded yet are shared undecoded (a ``RawDataElement`` is immutable), which
    keeps copying a few hundred headers cheap.
    """
    out = Dataset()
    for raw in ds.elements():
        tag = BaseTag(raw.tag)
        if tag.group == 0x7FE0:  # pixel data a caller's sources may hold: highdicom needs headers only
            continue
        if scrub and (tag in _DROPPED_TAGS or (nested and tag in _BLANKED_TAGS)):
            continue
        if scrub and tag in _BLANKED_TAGS:
            out.add(DataElement(tag, raw.VR or dictionary_VR(tag), ""))
        elif isinstance(raw, RawDataElement) and raw.VR not in (None, "SQ"):
            out[tag] = raw
        else:
            elem = ds[tag]  # decodes a raw element in ds (its value does not change)
            if elem.VR == "SQ":
                items = [_clean_copy(item, scrub=scrub, nested=True) for item in elem.value]
                out.add(DataElement(tag, "SQ", DicomSequence(items)))
            else:
                out.add(DataElement(tag, elem.VR, elem.value))  # a new element: the copy shares none with ds
    return out


def _scrub_output(ds: Dataset) -> int:
    """Remove identity from a built SEG/SR in place (belt and braces: its sources were scrubbed already).

    Returns:
        How many elements were emptied or removed.
    """
    changed = 0
    for item, nested in _walk(ds):
        for tag in [e.tag for e in item if e.tag in _DROPPED_TAGS or (nested and e.tag in _BLANKED_TAGS)]:
            del item[tag]
            changed += 1
        if not nested:
            for tag in _BLANKED_TAGS:
                if tag in item and item[tag].value not in (None, ""):
                    item[tag] = DataElement(tag, item[tag].VR, "")
                    changed += 1
    return changed


def _walk(ds: Dataset, nested: bool = False) -> Iterator[tuple[Dataset, bool]]:
    """``ds`` and every item of every sequence in it, depth first, with whether it is nested."""
    yield ds, nested
    for elem in ds:
        if elem.VR == "SQ":
            for item in elem.value:
                yield from _walk(item, True)


# --- SEG -----------------------------------------------------------------------------------------------


def write_seg(
    mask: np.ndarray,
    headers: Sequence[SliceHeader],
    segment_names: Mapping[int, str],
    algorithm: AlgorithmInfo,
    out_path: Path,
    *,
    include_phi: bool = False,
    sources: list[Dataset] | None = None,
    segment_kinds: Mapping[int, str] | None = None,
) -> Dataset:
    """Binary DICOM SEG of ``mask`` over the source series, written atomically to ``out_path``.

    One segment per foreground label in ``segment_names`` (label 0 = background is not a segment); frames
    are aligned with the source instances (see the module docstring for geometry, empty masks, UIDs and
    PHI).

    Args:
        mask: label volume ``(I, J, K)`` in the series' geometry (``mask[:, :, k].T`` is slice ``k``),
            integer or boolean; every non-zero value must be named in ``segment_names``. ``(I, J)`` is
            accepted for a one-slice series.
        headers: the series' sorted slice headers (``DicomSeries.headers``).
        segment_names: mask label -> segment name (e.g. ``{1: "lesion"}``).
        segment_kinds: mask label -> ``lesion`` or ``anatomy`` (default: every label a lesion).
        algorithm: the model that produced the mask.
        out_path: the ``.dcm`` file to write.
        include_phi: copy the patient's identity from the source (see the module docstring).
        sources: :func:`source_datasets` of ``headers``, if already read (saves reading them again).

    Returns:
        The SEG dataset (a ``highdicom.seg.Segmentation``).

    Raises:
        InputError: the mask does not fit the series, or holds labels that have no name.
        ConfigError: bad ``segment_names``.
        DicomError: the source series cannot carry a SEG (e.g. an unsupported multi-frame layout), or
            highdicom refused it.
    """
    _check_headers(headers)
    names = _segment_names(segment_names)
    kinds = dict(segment_kinds or {})
    planes = _label_planes(mask, headers, names)
    if sources is None:
        sources = source_datasets(headers)
    else:
        _check_sources(headers, sources)
    planes = _source_frame_order(planes, headers)

    first = headers[0]
    digest = hashlib.sha256()
    digest.update(np.ascontiguousarray(planes).data)
    digest.update(repr((sorted(names.items()), sorted(kinds.items()))).encode())
    digest.update(f"{algorithm.version}|{include_phi}".encode())
    series_uid = derive_uid(first.series_uid, algorithm.weights_sha256, "seg", "series")
    sop_uid = derive_uid(first.series_uid, algorithm.weights_sha256, "seg", "instance", digest.hexdigest())

    algorithm_id = hd.AlgorithmIdentificationSequence(
        name=_lo(algorithm.name),
        family=codes.cid7162.ArtificialIntelligence,
        version=_lo(algorithm.version),
        source=MANUFACTURER,
        parameters={"weights_sha256": algorithm.weights_sha256} if algorithm.weights_sha256 else None,
    )
    descriptions = []
    for number, (label, name) in enumerate(sorted(names.items()), start=1):
        lab = _PALETTE[(number - 1) % len(_PALETTE)]
        descriptions.append(
            hd.seg.SegmentDescription(
                segment_number=number,
                segment_label=name,
                segmented_property_category=_category(kinds.get(label, "lesion")),
                segmented_property_type=_property_type(name, kinds.get(label, "lesion")),
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                algorithm_identification=algorithm_id,
                tracking_uid=_segment_tracking_uid(first.series_uid, algorithm, label),
                tracking_id=_segment_tracking_id(label, name),
                display_color=hd.color.CIELabColor(*lab),
            )
        )
    empty = not planes.any()
    prepared = [_prepared_source(ds, include_phi) for ds in sources]
    try:
        seg = hd.seg.Segmentation(
            source_images=prepared,
            pixel_array=planes,
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=descriptions,
            series_instance_uid=series_uid,
            series_number=SEG_SERIES_NUMBER,
            sop_instance_uid=sop_uid,
            instance_number=1,
            manufacturer=MANUFACTURER,
            manufacturer_model_name=_lo(algorithm.name),
            software_versions=_lo(algorithm.version),
            device_serial_number=_lo(algorithm.weights_sha256 or "unknown"),
            content_label=SEG_LABEL,
            content_description=_lo(f"{algorithm.name} segmentation"),
            series_description=SEG_LABEL,
            omit_empty_frames=not empty,
        )
    except _HIGHDICOM_ERRORS as exc:
        raise DicomError(
            f"highdicom cannot build a SEG over this series ({type(exc).__name__}: {exc})",
            path=first.path.parent,
            fix="check that the series is a regular image series with patient geometry and a Frame of Reference",
        ) from exc

    _set_dimension_organization_uid(seg, derive_uid(sop_uid, "dimension-organization"))
    if not include_phi:
        removed = _scrub_output(seg)
        if removed:
            logger.debug("removed %d identifying element(s) highdicom copied into the SEG", removed)
    _write(seg, out_path)
    logger.debug("wrote SEG with %d frame(s) and %d segment(s) to %s", seg.NumberOfFrames, len(names), out_path)
    return seg


def _segment_names(segment_names: Mapping[int, str]) -> dict[int, str]:
    """Foreground labels and their names, checked (label 0 is dropped: it is the background)."""
    out: dict[int, str] = {}
    for label, name in segment_names.items():
        if isinstance(label, bool) or not isinstance(label, (int, np.integer)) or not 0 <= int(label) <= 65535:
            raise ConfigError(
                f"segment label {label!r} is not a whole number in 0..65535", fix="use the mask values as keys"
            )
        if int(label) == 0:
            continue
        if not isinstance(name, str) or not name.strip() or len(name) > 64 or "\\" in name:
            raise ConfigError(
                f"segment name {name!r} of label {label} must be 1-64 characters without a backslash",
                fix="use a short name such as 'lesion'",
            )
        out[int(label)] = name.strip()
    if not out:
        raise ConfigError(
            "segment_names names no foreground label (only label 0, the background, or nothing)",
            fix="name the mask's labels, e.g. {1: 'lesion'}",
        )
    return out


def _label_planes(mask: np.ndarray, headers: Sequence[SliceHeader], names: Mapping[int, str]) -> np.ndarray:
    """The mask as SEG planes ``(K, rows, cols)`` in k order, holding segment numbers 1..N (0 elsewhere)."""
    first = headers[0]
    where = first.path.parent
    arr = np.asarray(mask)
    if arr.ndim == 2 and len(headers) == 1:
        arr = arr[:, :, np.newaxis]
    expected = (first.cols, first.rows, len(headers))
    if arr.shape != expected:
        raise InputError(
            f"mask shape {arr.shape} does not match the series, which needs (columns, rows, slices) = {expected}",
            path=where,
            fix="pass the mask in the geometry of the series it was predicted on (Study.array's shape)",
        )
    if arr.dtype == np.bool_:
        arr = arr.view(np.uint8)
    elif np.issubdtype(arr.dtype, np.floating):
        if not np.all(np.isfinite(arr)) or not np.array_equal(arr, np.round(arr)):
            raise InputError(
                "mask holds values that are not whole numbers", path=where, fix="pass an integer label mask"
            )
        arr = arr.astype(np.int64)
    elif not np.issubdtype(arr.dtype, np.integer):
        raise InputError(f"mask has dtype {arr.dtype}", path=where, fix="pass an integer or boolean label mask")
    lowest, highest = (int(arr.min()), int(arr.max())) if arr.size else (0, 0)
    if lowest < 0 or highest > 65535:
        raise InputError(
            f"mask values span {lowest}..{highest}; labels must be in 0..65535", path=where, fix="pass a label mask"
        )
    numbers = sorted(names)
    undescribed = len(numbers) + 1
    dtype = np.uint8 if undescribed <= 255 else np.uint16
    lut = np.full(max(highest, max(numbers)) + 1, undescribed, dtype=dtype)
    lut[0] = 0
    for number, label in enumerate(numbers, start=1):
        lut[label] = number
    planes = lut[arr.transpose(2, 1, 0)]  # (K, J=rows, I=cols), a new C-contiguous array
    if int(planes.max(initial=0)) == undescribed:
        unnamed = sorted(int(v) for v in np.unique(arr.transpose(2, 1, 0)[planes == undescribed]))
        raise InputError(
            f"mask holds label(s) {unnamed[:10]} that segment_names does not name (named: {numbers})",
            path=where,
            fix="name every foreground label in segment_names, or zero those voxels",
        )
    return planes


def _source_frame_order(planes: np.ndarray, headers: Sequence[SliceHeader]) -> np.ndarray:
    """Reorder k-ordered planes into the order highdicom pairs them with the sources.

    Single-frame sources are passed in k order, so nothing changes. A multi-frame source is one file whose
    frames highdicom takes in file order: plane ``f`` must then be the slice ``k`` with ``headers[k].frame
    == f``.
    """
    if all(h.n_frames == 1 for h in headers):
        return planes
    first = headers[0]
    files = list(dict.fromkeys(h.path for h in headers))
    if len(files) != 1:
        raise DicomError(
            f"the series spreads over {len(files)} files of which some hold several frames; a SEG can only "
            "reference one multi-frame source instance or a set of single-frame instances",
            path=first.path.parent,
            fix="write the SEG from a series stored as single-frame files, or as one multi-frame file",
            files=files,
        )
    n_frames = first.n_frames
    frames = sorted(h.frame for h in headers)
    if frames != list(range(n_frames)):
        raise DicomError(
            f"the series uses {len(frames)} of the {n_frames} frames of its multi-frame file; highdicom pairs the "
            "SEG frames with all frames of the source",
            path=first.path,
            fix="write the SEG from a series that uses every frame of its file",
        )
    order = np.empty(n_frames, dtype=np.intp)
    for k, h in enumerate(headers):
        order[h.frame] = k
    return planes[order]


def _category(kind: str) -> Code:
    return codes.SCT.AnatomicalStructure if kind == "anatomy" else codes.SCT.MorphologicallyAbnormalStructure


def _property_type(name: str, kind: str = "lesion") -> Code:
    if kind == "anatomy":
        # the segmentation property type (CID 7151, anatomic structures only: not a qualifier such as
        # "Anterior" that happens to be a SNOMED concept too) named like the label, if any
        keyword = "".join(part[:1].upper() + part[1:] for part in re.split(r"[^A-Za-z0-9]+", name) if part)
        if keyword in codes.cid7151.dir():
            code = getattr(codes.cid7151, keyword)
            if isinstance(code, Code):
                return code
        return codes.SCT.AnatomicalStructure
    return _PROPERTY_TYPES.get(name.strip().lower(), codes.SCT.Lesion)


def _segment_tracking_uid(series_uid: str, algorithm: AlgorithmInfo, label: int) -> str:
    return derive_uid(series_uid, algorithm.weights_sha256, "seg", "segment", str(label))


def _segment_tracking_id(label: int, name: str) -> str:
    return _lo(f"{name} (mask label {label})")


def _set_dimension_organization_uid(seg: Dataset, uid: str) -> None:
    """Replace highdicom's random DimensionOrganizationUID with a derived one (reruns give equal files)."""
    for keyword in ("DimensionOrganizationSequence", "DimensionIndexSequence"):
        for item in seg.get(keyword, []):
            if "DimensionOrganizationUID" in item:
                item.DimensionOrganizationUID = uid


# --- SR ------------------------------------------------------------------------------------------------


def write_sr(
    findings: Findings,
    headers: Sequence[SliceHeader],
    seg: Dataset | None,
    algorithm: AlgorithmInfo,
    out_path: Path,
    *,
    include_phi: bool = False,
    sources: list[Dataset] | None = None,
) -> Dataset:
    """Comprehensive 3D SR with a TID 1500 measurement report of ``findings``, written atomically.

    Reports the study's score and the decision (qualitative evaluation), when there is a verdict, and,
    when ``seg`` is given, one volumetric ROI group per segmented class that references the class' SEG
    segment with its volume (mL, UCUM) and, for lesions, component count. ``seg=None`` (no mask) reports
    the verdict only; segments are then left out (they have no region to reference).

    Args:
        findings: what to report.
        headers: the source series' sorted slice headers.
        seg: the SEG written by :func:`write_seg` for this series, or ``None``.
        algorithm: the model that produced the findings.
        out_path: the ``.dcm`` file to write.
        include_phi: copy the patient's identity from the source (see the module docstring).
        sources: :func:`source_datasets` of ``headers``, if already read.

    Returns:
        The SR dataset (a ``highdicom.sr.Comprehensive3DSR``).

    Raises:
        InputError: findings out of range, or a class the SEG has no segment for.
        DicomError: the SEG does not belong to the series, or highdicom refused the report.
    """
    _check_headers(headers)
    _check_findings(findings, headers)
    if sources is None:
        sources = source_datasets(headers)
    else:
        _check_sources(headers, sources)
    first = headers[0]
    if seg is not None:
        _check_seg(seg, first)
    elif findings.segments:
        logger.debug("no SEG: %d segmented class(es) left out of the SR", len(findings.segments))

    digest = hashlib.sha256(
        repr(
            (
                findings,
                None if seg is None else str(seg.SOPInstanceUID),
                algorithm.name,
                algorithm.version,
                include_phi,
            )
        ).encode()
    ).hexdigest()
    series_uid = derive_uid(first.series_uid, algorithm.weights_sha256, "sr", "series")
    sop_uid = derive_uid(first.series_uid, algorithm.weights_sha256, "sr", "instance", digest)
    parameters = [] if findings.threshold is None else [f"decision threshold={findings.threshold:g}"]
    if algorithm.weights_sha256:
        parameters.append(f"weights_sha256={algorithm.weights_sha256}")
    prepared = [_prepared_source(ds, include_phi) for ds in sources]
    try:
        algorithm_id = hd.sr.AlgorithmIdentification(
            name=_lo(algorithm.name), version=_lo(algorithm.version), parameters=parameters, manufacturer=MANUFACTURER
        )
        groups: list[Any] = []
        if findings.decision is not None:
            groups.append(_classification_group(findings, first.series_uid, algorithm, algorithm_id))
        if seg is not None:
            groups += [
                _segment_group(segment, seg, first.series_uid, algorithm, algorithm_id) for segment in findings.segments
            ]
        observer = hd.sr.ObserverContext(
            observer_type=codes.cid270.Device,
            observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
                uid=derive_uid(MANUFACTURER, algorithm.name, algorithm.version, algorithm.weights_sha256, "device"),
                name=_lo(algorithm.name),
                manufacturer_name=MANUFACTURER,
                model_name=_lo(algorithm.version),
            ),
        )
        report = hd.sr.MeasurementReport(
            observation_context=hd.sr.ObservationContext(observer_device_context=observer),
            procedure_reported=_procedure_code(first.modality),
            imaging_measurements=groups or None,
            title=codes.cid7021.ImagingMeasurementReport,
        )
        evidence: list[Dataset] = [*prepared, *([seg] if seg is not None else [])]
        sr = hd.sr.Comprehensive3DSR(
            evidence=evidence,
            content=report,
            series_instance_uid=series_uid,
            series_number=SR_SERIES_NUMBER,
            sop_instance_uid=sop_uid,
            instance_number=1,
            manufacturer=MANUFACTURER,
            is_complete=True,
            is_final=False,
            manufacturer_model_name=_lo(algorithm.name),
            software_versions=_lo(algorithm.version),
            device_serial_number=_lo(algorithm.weights_sha256 or "unknown"),
            series_description=SR_LABEL,
        )
    except _HIGHDICOM_ERRORS as exc:
        raise DicomError(
            f"highdicom cannot build the SR ({type(exc).__name__}: {exc})",
            path=first.path.parent,
            fix="check the findings and that the SEG was written for this series",
        ) from exc
    if not include_phi:
        removed = _scrub_output(sr)
        if removed:
            logger.debug("removed %d identifying element(s) highdicom copied into the SR", removed)
    _write(sr, out_path)
    logger.debug("wrote SR to %s", out_path)
    return sr


def _check_findings(findings: Findings, headers: Sequence[SliceHeader]) -> None:
    where = headers[0].path.parent
    verdict = (findings.probability, findings.decision, findings.threshold)
    if findings.decision == "not_assessed":  # outside the model's scope: no score, no threshold
        if findings.probability is not None or findings.threshold is not None:
            raise InputError("findings: a study not assessed has no probability or threshold", path=where)
    elif any(v is None for v in verdict) and any(v is not None for v in verdict):
        raise InputError(
            "findings: probability, decision and threshold must be given together (or all None: no verdict)",
            path=where,
        )
    if findings.decision not in (None, "not_assessed"):
        for field, value in (("probability", findings.probability), ("threshold", findings.threshold)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
                raise InputError(f"findings.{field} must be a number in 0..1, got {value!r}", path=where)
        if findings.decision not in DECISIONS:
            raise InputError(
                f"findings.decision must be one of {DECISIONS}, got {findings.decision!r}",
                path=where,
                fix="pass 'abnormal' or 'normal'",
            )
    labels = [segment.label for segment in findings.segments]
    if len(set(labels)) != len(labels):
        raise InputError(f"findings.segments repeats a label: {labels}", path=where, fix="one entry per class")
    for segment in findings.segments:
        volume, components = segment.volume_ml, segment.components
        if not (isinstance(volume, (int, float)) and math.isfinite(volume)) or volume < 0:
            raise InputError(f"segment {segment.label}: volume_ml must be a finite number >= 0", path=where)
        if isinstance(components, bool) or not isinstance(components, (int, np.integer)):
            raise InputError(f"segment {segment.label}: components must be a whole number", path=where)
        if components < 0:
            raise InputError(f"segment {segment.label}: components must be >= 0", path=where)
        if segment.kind not in ("lesion", "anatomy"):
            raise InputError(f"segment {segment.label}: kind must be lesion or anatomy", path=where)


def _check_seg(seg: Dataset, first: SliceHeader) -> None:
    """The SEG must be a segmentation of this study that references this series."""
    if str(seg.get("Modality", "")) != "SEG" or "SegmentSequence" not in seg:
        raise DicomError("the dataset given as seg is not a DICOM SEG", fix="pass the dataset write_seg returned")
    referenced = {str(item.get("SeriesInstanceUID", "")) for item in seg.get("ReferencedSeriesSequence", [])} | {
        str(item.get("SeriesInstanceUID", ""))
        for study in seg.get("StudiesContainingOtherReferencedInstancesSequence", [])
        for item in study.get("ReferencedSeriesSequence", [])
    }
    if str(seg.get("StudyInstanceUID", "")) != first.study_uid or first.series_uid not in referenced:
        raise DicomError(
            "the SEG does not reference this series",
            path=first.path.parent,
            fix="pass the SEG written from the same series' headers",
        )


def _classification_group(
    findings: Findings, series_uid: str, algorithm: AlgorithmInfo, algorithm_id: hd.sr.AlgorithmIdentification
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """TID 1501 group: probability of abnormality and the decision; for a study outside the model's scope,
    Normality = Not Evaluated (SCT 373121007) and no measurement."""
    if findings.decision == "not_assessed":
        return hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(
                uid=derive_uid(series_uid, algorithm.weights_sha256, "sr", "classification"),
                identifier="study classification",
            ),
            algorithm_id=algorithm_id,
            qualitative_evaluations=[
                hd.sr.QualitativeEvaluation(name=codes.DCM.Normality, value=codes.SCT.NotEvaluated)
            ],
        )
    assert findings.probability is not None  # only called with a verdict (checked in _check_findings)
    probability = hd.sr.Measurement(
        name=codes.DCM.Probability if findings.is_probability else codes.SCT.Score,
        value=round(float(findings.probability), PROBABILITY_DECIMALS),
        unit=codes.UCUM.NoUnits,
    )
    decision = hd.sr.QualitativeEvaluation(
        name=codes.DCM.Normality,
        value=codes.SCT.Abnormal if findings.decision == "abnormal" else codes.SCT.Normal,
    )
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=derive_uid(series_uid, algorithm.weights_sha256, "sr", "classification"),
            identifier="study classification",
        ),
        algorithm_id=algorithm_id,
        measurements=[probability],
        qualitative_evaluations=[decision],
    )


def _segment_group(
    segment: SegmentFinding,
    seg: Dataset,
    series_uid: str,
    algorithm: AlgorithmInfo,
    algorithm_id: hd.sr.AlgorithmIdentification,
) -> hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations:
    """TID 1411 group: one segmented class, its SEG segment, its volume (and, for a lesion, its count)."""
    item = _find_segment(seg, segment, _segment_tracking_uid(series_uid, algorithm, segment.label))
    tracking_uid = str(item.get("TrackingUID", "")) or _segment_tracking_uid(series_uid, algorithm, segment.label)
    measurements = [
        hd.sr.Measurement(
            name=codes.SCT.Volume, value=round(float(segment.volume_ml), VOLUME_DECIMALS), unit=MILLILITER
        ),
    ]
    if segment.kind == "lesion":
        measurements.append(
            hd.sr.Measurement(name=codes.SCT.NumberOfLesions, value=int(segment.components), unit=codes.UCUM.NoUnits)
        )
    return hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=tracking_uid, identifier=_segment_tracking_id(segment.label, segment.name)
        ),
        referenced_segment=hd.sr.ReferencedSegment(
            sop_class_uid=str(seg.SOPClassUID),
            sop_instance_uid=str(seg.SOPInstanceUID),
            segment_number=int(item.SegmentNumber),
            source_series=hd.sr.SourceSeriesForSegmentation(series_uid),
        ),
        finding_type=_property_type(segment.name, segment.kind),
        finding_category=_category(segment.kind),
        algorithm_id=algorithm_id,
        measurements=measurements,
    )


def _find_segment(seg: Dataset, segment: SegmentFinding, tracking_uid: str) -> Dataset:
    """The SEG's segment item of a class: by TrackingUID (SEGs from write_seg), else by the mask label in
    the TrackingID, else by a unique SegmentLabel equal to the class name."""
    segments = list(seg.SegmentSequence)
    for item in segments:
        if str(item.get("TrackingUID", "")) == tracking_uid:
            return item
    pattern = re.compile(rf"\(mask label {segment.label}\)$")
    by_id = [item for item in segments if pattern.search(str(item.get("TrackingID", "")))]
    if len(by_id) == 1:
        return by_id[0]
    by_label = [item for item in segments if str(item.get("SegmentLabel", "")) == segment.name]
    if len(by_label) == 1:
        return by_label[0]
    raise InputError(
        f"the SEG has no segment for class {segment.label} ({segment.name!r}); it has "
        f"{[str(item.get('SegmentLabel', '')) for item in segments]}",
        fix="pass the SEG written with the same segment_names as the findings",
    )


def _procedure_code(modality: str) -> Code:
    return {
        "CT": codes.LN.CTUnspecifiedBodyRegion,
        "MR": codes.LN.MRIUnspecifiedBodyRegion,
        "PT": codes.LN.PETUnspecifiedBodyRegion,
        "NM": codes.LN.NMUnspecifiedBodyRegion,
        "CR": codes.LN.XRUnspecifiedBodyRegion,
        "DX": codes.LN.XRUnspecifiedBodyRegion,
    }.get(modality.upper(), codes.SCT.ImagingProcedure)


# --- writing -------------------------------------------------------------------------------------------


def _lo(text: str) -> str:
    """A value for a LO attribute: at most 64 characters, no backslash."""
    return text.replace("\\", "/")[:64]


def _write(ds: Dataset, out_path: Path) -> None:
    """Serialise ``ds`` as a DICOM Part 10 file in memory, then move it into place atomically."""
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    atomic_write_bytes(Path(out_path), buffer.getvalue())
