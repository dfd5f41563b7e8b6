"""DICOM at the file level: find files among junk, parse headers safely, decode pixel data.

Everything pydicom can throw at a bad file is turned here into a typed :mod:`medhybrid.errors`
exception that names the file, so a batch (scan, infer) can record it and go on.
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.pixels import get_decoder
from pydicom.uid import UID

from medhybrid.errors import (
    CorruptPixelDataError,
    InvalidTagError,
    MedHybridError,
    NotAnImageError,
    NotDicomError,
    TruncatedFileError,
    UnsupportedTransferSyntaxError,
)
from medhybrid.io.study import SAFE_DICOM_KEYWORDS, QCReason, Verdict

logger = logging.getLogger(__name__)

# Files that are certainly not DICOM are ignored without being opened.
NON_DICOM_SUFFIXES = frozenset(
    [
        ".txt",
        ".md",
        ".json",
        ".csv",
        ".tsv",
        ".xml",
        ".html",
        ".htm",
        ".pdf",
        ".png",
        ".jpg",
        ".jpeg",
        ".gif",
        ".bmp",
        ".tif",
        ".tiff",
        ".nii",
        ".gz",
        ".nrrd",
        ".mha",
        ".mhd",
        ".raw",
        ".zip",
        ".tar",
        ".npz",
        ".npy",
        ".py",
        ".yaml",
        ".yml",
        ".log",
        ".ini",
        ".db",
        ".exe",
        ".sh",
        ".bat",
        ".lnk",
    ]
)
DICOM_SUFFIXES = frozenset({".dcm", ".dicom", ".ima", ".dc3"})
MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"

# DICOM objects with pixel data that are not images to analyse: derived labels, dose grids, documents.
NON_IMAGE_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.66.4": "a DICOM SEG is a derived segmentation, not a source image",
    "1.2.840.10008.5.1.4.1.1.481.2": "an RT Dose grid is not an image",
    "1.2.840.10008.5.1.4.1.1.104.1": "an encapsulated PDF is a document, not an image",
}
NON_IMAGE_MODALITIES = {"SR", "SEG", "RTPLAN", "RTSTRUCT", "RTDOSE", "RTRECORD", "KO", "PR", "DOC", "REG"}

# Only these tags are parsed (pydicom skips the values of all others): much faster on big headers.
HEADER_TAGS: list[str] = sorted(
    set(SAFE_DICOM_KEYWORDS)
    | {
        "SOPClassUID",
        "SOPInstanceUID",
        "StudyInstanceUID",
        "SeriesInstanceUID",
        "Modality",
        "InstanceNumber",
        "Rows",
        "Columns",
        "SamplesPerPixel",
        "NumberOfFrames",
        "PhotometricInterpretation",
        "BitsAllocated",
        "BitsStored",
        "PixelRepresentation",
        "ImagePositionPatient",
        "ImageOrientationPatient",
        "PixelSpacing",
        "ImagerPixelSpacing",
        "SliceThickness",
        "SpacingBetweenSlices",
        "RescaleSlope",
        "RescaleIntercept",
        "SharedFunctionalGroupsSequence",
        "PerFrameFunctionalGroupsSequence",
    }
)


@dataclass
class SliceHeader:
    """What medhybrid needs from one frame of one DICOM file (a single-frame file has frame 0)."""

    path: Path
    frame: int
    n_frames: int
    study_uid: str
    series_uid: str
    sop_uid: str
    sop_class: str
    modality: str
    transfer_syntax: str
    rows: int
    cols: int
    samples: int
    photometric: str
    instance_number: int | None
    position: tuple[float, float, float] | None
    orientation: tuple[float, ...] | None
    pixel_spacing: tuple[float, float] | None  # (between rows, between columns), mm
    spacing_tag: str | None
    slice_thickness: float | None
    slope: float
    intercept: float
    safe_metadata: dict[str, Any] = field(default_factory=dict)
    notes: list[QCReason] = field(default_factory=list)
    # the parsed file with its pixel bytes, kept by a single-pass load (see discover_dicom)
    dataset: Dataset | None = field(default=None, repr=False, compare=False)


@dataclass(frozen=True)
class FileProblem:
    """A file that was skipped: ``rejected`` files claimed to be DICOM images and failed."""

    path: Path
    code: str
    reason: str

    def as_dict(self) -> dict[str, str]:
        return {"path": str(self.path), "code": self.code, "reason": self.reason}


# --- discovery -----------------------------------------------------------------------------------


# medhybrid marks every folder it writes (an ``infer`` output and each study folder in it) with this file, so
# that its own masks, saliency maps and thumbnails are never read back as studies, wherever they are moved.
OUTPUT_MARKER = ".medhybrid-output"


def iter_files(root: Path) -> Iterator[Path]:
    """Every regular file under ``root`` in a stable order, skipping hidden files and folders and medhybrid's
    own output folders (:data:`OUTPUT_MARKER`)."""
    if root.is_file():
        yield root
        return
    for dirpath, dirnames, filenames in os.walk(root):
        if OUTPUT_MARKER in filenames:
            logger.debug("%s: a medhybrid output folder, not read", dirpath)
            dirnames[:] = []
            continue
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if not name.startswith("."):
                yield Path(dirpath) / name


def sniff_dicom(path: Path) -> str:
    """Classify a file cheaply: ``dicom`` (has the DICM preamble), ``maybe`` (worth a forced parse),
    ``dicomdir`` or ``no``."""
    if path.name.upper() == "DICOMDIR":
        return "dicomdir"
    suffix = path.suffix.lower()
    if suffix in NON_DICOM_SUFFIXES:
        return "no"
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return "no"
    if len(head) == 132 and head[128:132] == b"DICM":
        return "dicom"
    # A raw data set (no preamble) begins with a group-0002 or group-0008 tag in either byte order.
    if head[:2] in (b"\x08\x00", b"\x02\x00", b"\x00\x08", b"\x00\x02") or suffix in DICOM_SUFFIXES:
        return "maybe"
    return "no"


# --- parsing -------------------------------------------------------------------------------------


FATAL = (KeyboardInterrupt, SystemExit, GeneratorExit)


def third_party_failure(exc: BaseException) -> bool:
    """True for anything a parser or decoder may raise on bad bytes: every exception except the process's own
    stop signals. Rust decoders (pylibjpeg-rle) panic with ``pyo3_runtime.PanicException``, a BaseException
    that ``except Exception`` does not catch, so the two boundaries (header parse, pixel decode) catch
    BaseException and let only these through."""
    return not isinstance(exc, FATAL)


@contextmanager
def recorded_warnings() -> Iterator[list[warnings.WarningMessage]]:
    """Collect pydicom's warnings (invalid VRs, odd values) instead of printing them; they are
    logged at debug level and, where they matter, turned into typed errors or QC reasons."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield caught
    for w in caught:
        logger.debug("pydicom: %s", w.message)


def read_dataset(
    path: Path, *, tags: list[str] | None = None, forced: bool = False, defer_size: int | None = None
) -> Dataset:
    """Parse ``path`` with pydicom, turning every failure into a typed error naming the file.

    Args:
        tags: parse only these keywords (others are skipped); ``None`` parses everything.
        forced: the file has no DICM preamble; parse it anyway and check it looks like a data set.
        defer_size: values longer than this are not read (their length and offset are kept).

    Raises:
        NotDicomError, TruncatedFileError
    """
    with recorded_warnings() as caught:
        try:
            ds = pydicom.dcmread(path, specific_tags=tags, force=forced, defer_size=defer_size)
        except InvalidDicomError as exc:
            raise NotDicomError(
                f"not a DICOM file ({exc})", path=path, fix="remove it or re-export it as DICOM Part 10"
            ) from None
        except (EOFError, OSError) as exc:
            raise TruncatedFileError(
                f"file ends early ({exc})", path=path, fix="re-copy or re-export the file"
            ) from None
        except BaseException as exc:  # pydicom raises many types on garbage; all mean "cannot parse"
            if not third_party_failure(exc):
                raise
            raise NotDicomError(
                f"cannot be parsed as DICOM ({type(exc).__name__}: {exc})",
                path=path,
                fix="remove it or re-export it as DICOM Part 10",
            ) from None
    try:
        return _checked(ds, path, forced, [str(w.message) for w in caught])
    except MedHybridError:
        raise
    except BaseException as exc:  # values are converted lazily: the checks below read some (unknown VR, ...)
        if not third_party_failure(exc):
            raise
        raise NotDicomError(
            f"cannot be parsed as DICOM ({type(exc).__name__}: {str(exc)[:160]})",
            path=path,
            fix="remove it or re-export it as DICOM Part 10",
        ) from None


def _checked(ds: Dataset, path: Path, forced: bool, texts: list[str]) -> Dataset:
    """The parsed data set, after the checks that tell a truncated file, a non-data-set and a DICOMDIR."""
    if any("End of file reached" in t or "delimiter" in t.lower() for t in texts):
        raise TruncatedFileError(
            "file ends before its data set does ("
            + next(t for t in texts if "End of file reached" in t or "delimiter" in t.lower())[:120]
            + ")",
            path=path,
            fix="re-copy or re-export the file",
        )
    if forced and ("SOPClassUID" not in ds or len(ds) < 3):
        raise NotDicomError(
            "no DICOM preamble/File Meta and the content does not parse as a data set",
            path=path,
            fix="remove it or re-export it as DICOM Part 10",
        )
    if is_dicomdir(ds):
        raise NotAnImageError("a DICOMDIR index, not an image", path=path, fix="nothing to do: it is skipped")
    meta = getattr(ds, "file_meta", None)
    if meta and "TransferSyntaxUID" not in meta:
        transfer_syntax_of(ds, path)  # a File Meta without a syntax: nothing after it parses reliably
    if len(ds) == 0:
        raise TruncatedFileError("file holds no data elements", path=path, fix="re-copy the file")
    return ds


def image_tag(ds: Dataset, keyword: str, path: Path, cast: type, default: Any = None) -> Any:
    """Read one tag, cast it, and raise InvalidTagError (not ValueError) on garbage."""
    if keyword not in ds or ds[keyword].value in (None, ""):
        return default
    value = ds[keyword].value
    try:
        if cast is tuple:
            out = tuple(float(v) for v in (value if isinstance(value, (list, tuple, MultiValue)) else [value]))
            if not all(math.isfinite(v) for v in out):
                raise ValueError("not finite")
            return out
        result = cast(value)
        if cast is float and not math.isfinite(result):
            raise ValueError("not finite")
        return result
    except (TypeError, ValueError, OverflowError) as exc:
        raise InvalidTagError(
            f"{keyword} holds an invalid value {value!r} ({exc})",
            path=path,
            fix=f"correct {keyword} in the file (e.g. with pydicom or dcmodify)",
        ) from None


def _first_item(ds: Dataset | None, seq: str) -> Dataset | None:
    if ds is None or seq not in ds:
        return None
    items = ds[seq].value
    return items[0] if items else None


def _functional(shared: Dataset | None, per_frame: Dataset | None, seq: str) -> Dataset | None:
    """A functional-group macro item, per-frame first, then shared (PS3.3 C.7.6.16)."""
    return _first_item(per_frame, seq) or _first_item(shared, seq)


def is_dicomdir(ds: Dataset) -> bool:
    """A DICOMDIR index, told by its Media Storage SOP Class (no need to parse its record sequence)."""
    meta = getattr(ds, "file_meta", None)
    media_class = str(meta.get("MediaStorageSOPClassUID", "")) if meta is not None else ""
    return MEDIA_STORAGE_DIRECTORY in (media_class, str(ds.get("SOPClassUID", "")))


def check_image_object(ds: Dataset, path: Path) -> None:
    """Raise NotAnImageError for DICOM objects that hold no image to analyse."""
    sop = str(ds.get("SOPClassUID", ""))
    modality = str(ds.get("Modality", "")).upper()
    if is_dicomdir(ds):
        raise NotAnImageError("a DICOMDIR index, not an image", path=path, fix="nothing to do: it is skipped")
    if sop in NON_IMAGE_SOP_CLASSES:
        raise NotAnImageError(NON_IMAGE_SOP_CLASSES[sop], path=path, fix="nothing to do: it is skipped")
    if modality in NON_IMAGE_MODALITIES:
        raise NotAnImageError(
            f"modality {modality} holds no image to analyse", path=path, fix="nothing to do: it is skipped"
        )
    if "Rows" not in ds or "Columns" not in ds:
        raise NotAnImageError("no image (Rows/Columns absent)", path=path, fix="nothing to do: it is skipped")


_NATIVE_BY_ENCODING = {  # (implicit VR, little endian) -> native transfer syntax
    (True, True): "1.2.840.10008.1.2",
    (False, True): "1.2.840.10008.1.2.1",
    (False, False): "1.2.840.10008.1.2.2",
}


def transfer_syntax_of(ds: Dataset, path: Path) -> str:
    meta = getattr(ds, "file_meta", None)
    ts = meta.get("TransferSyntaxUID") if meta is not None else None
    encoding = getattr(ds, "original_encoding", None)
    if not ts and not meta and encoding in _NATIVE_BY_ENCODING:
        # A bare data set (no preamble, no File Meta: ACR-NEMA style) always holds native pixel data;
        # pydicom detected its VR and byte order while parsing, which fixes the syntax.
        ts = UID(_NATIVE_BY_ENCODING[encoding])
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ts
    if not ts:
        raise UnsupportedTransferSyntaxError(
            "the File Meta lacks TransferSyntaxUID, so the pixel encoding is unknown",
            path=path,
            fix="rewrite the file with a File Meta header (e.g. pydicom: ds.save_as(..., enforce_file_format=True))",
        )
    uid = UID(str(ts).strip())
    if not uid.is_transfer_syntax:
        # a private syntax (GE's 1.2.840.113619.5.2 implicit big endian, ...) or garbage: pydicom knows no
        # encoding for it, and guessing one would decode noise
        raise UnsupportedTransferSyntaxError(
            f"transfer syntax {uid} is not a standard DICOM transfer syntax (private or invalid)",
            path=path,
            fix="convert the file to a standard syntax on the source system (e.g. export as Explicit VR Little "
            "Endian) or with dcmtk: dcmconv +te",
        )
    if uid.is_compressed:
        try:
            decoder = get_decoder(uid)
        except NotImplementedError:
            decoder = None
        if decoder is None or not decoder.is_available:
            raise UnsupportedTransferSyntaxError(
                f"no installed decoder for transfer syntax {uid.name or uid} ({uid})",
                path=path,
                fix="install the pylibjpeg plugins (`pip install medhybrid` pulls them) or decompress the file",
            )
    return str(uid)


def slice_headers(
    ds: Dataset, path: Path, metadata_cache: dict[str, dict[str, Any]] | None = None
) -> list[SliceHeader]:
    """One :class:`SliceHeader` per frame of ``ds``.

    Args:
        metadata_cache: series UID -> safe metadata; the whitelisted metadata is series-level, so it is
            converted once per series rather than once per file.

    Raises:
        NotAnImageError, UnsupportedTransferSyntaxError, InvalidTagError
    """
    with recorded_warnings():  # values are converted lazily, so pydicom may warn (and raise) here too
        try:
            return _slice_headers(ds, path, {} if metadata_cache is None else metadata_cache)
        except MedHybridError:
            raise
        except BaseException as exc:  # a value pydicom cannot convert: unknown VR, lying length, bad charset...
            if not third_party_failure(exc):
                raise
            raise InvalidTagError(
                f"a header value cannot be read ({type(exc).__name__}: {str(exc)[:160]})",
                path=path,
                fix="the file is damaged: re-export it from the source system",
            ) from None


def _slice_headers(ds: Dataset, path: Path, metadata_cache: dict[str, dict[str, Any]]) -> list[SliceHeader]:
    check_image_object(ds, path)
    file_notes = []
    if not getattr(ds, "file_meta", None):
        file_notes.append(QCReason(Verdict.WARN, "no_file_meta", "no DICOM File Meta header: transfer syntax inferred"))
    ts = transfer_syntax_of(ds, path)
    n_frames = image_tag(ds, "NumberOfFrames", path, int, 1) or 1
    rows = image_tag(ds, "Rows", path, int)
    cols = image_tag(ds, "Columns", path, int)
    if not rows or not cols or n_frames < 1:
        raise InvalidTagError(
            f"image size Rows={rows} Columns={cols} NumberOfFrames={n_frames}",
            path=path,
            fix="the file is damaged",
        )
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip()
    samples = 3 if photometric == "PALETTE COLOR" else image_tag(ds, "SamplesPerPixel", path, int, 1)
    check_pixel_budget(ds, path, rows, cols, n_frames, samples, ts)
    series_uid = str(ds.get("SeriesInstanceUID", ""))
    if not series_uid or series_uid not in metadata_cache:
        metadata_cache[series_uid] = safe_metadata(ds)
    common = {
        "path": path,
        "n_frames": n_frames,
        "study_uid": str(ds.get("StudyInstanceUID", "")),
        "series_uid": series_uid,
        "sop_uid": str(ds.get("SOPInstanceUID", "")),
        "sop_class": str(ds.get("SOPClassUID", "")),
        "modality": str(ds.get("Modality", "") or "OT").upper(),
        "transfer_syntax": ts,
        "rows": rows,
        "cols": cols,
        # a palette-colour image decodes to RGB
        "samples": samples,
        "photometric": photometric,
        "instance_number": image_tag(ds, "InstanceNumber", path, int),
        "safe_metadata": metadata_cache[series_uid],
    }
    notes = list(file_notes)
    shared = _first_item(ds, "SharedFunctionalGroupsSequence")
    per_frame_items = list(ds.PerFrameFunctionalGroupsSequence) if "PerFrameFunctionalGroupsSequence" in ds else []
    headers = []
    # frames without a per-frame item share one geometry: read it once (a header claiming 10^5 frames must
    # not cost 10^5 geometry reads)
    common_geometry = _frame_geometry(ds, shared, None, path) if len(per_frame_items) < n_frames else None
    for frame in range(n_frames):
        per = per_frame_items[frame] if frame < len(per_frame_items) else None
        geometry = _frame_geometry(ds, shared, per, path) if per is not None else common_geometry
        assert geometry is not None
        headers.append(SliceHeader(frame=frame, notes=list(notes), **common, **geometry))
    return headers


# The largest decoded pixel buffer one file may ask for (all frames, before rescale). A header is only a
# claim: checking it against the file before anything is allocated is what keeps a lying header from asking
# for terabytes (MemoryError) or looping over a billion frames (a hang). No library does this check for us.
MAX_DECODED_BYTES = int(os.environ.get("MEDHYBRID_MAX_DECODED_BYTES", 4 << 30))
ITEM_HEADER_BYTES = 8  # each frame of encapsulated pixel data is at least one item (tag + length)


def check_pixel_budget(ds: Dataset, path: Path, rows: int, cols: int, frames: int, samples: int, ts: str) -> None:
    """Raise CorruptPixelDataError when the declared image cannot be in this file or is too big to decode.

    Native pixel data must fit in the file (rows x cols x frames x samples x BitsAllocated/8 bytes);
    encapsulated data needs one item per frame and a decoded size under :data:`MAX_DECODED_BYTES`.
    """
    bits = image_tag(ds, "BitsAllocated", path, int, 16)
    if samples < 1 or samples > 4 or bits < 1 or bits > 64:
        raise InvalidTagError(
            f"SamplesPerPixel={samples} BitsAllocated={bits} describe no image",
            path=path,
            fix="the file is damaged: re-export it",
        )
    decoded = rows * cols * frames * samples * max(bits, 8) // 8
    native = not UID(ts).is_compressed
    needed = -(-rows * cols * frames * samples * bits // 8) if native else frames * ITEM_HEADER_BYTES
    available, where = _pixel_bytes(ds, path)
    if needed > available or decoded > MAX_DECODED_BYTES:
        what = f"{frames} frame(s) of {rows}x{cols}x{samples} at {bits} bits ({decoded:,} bytes decoded)"
        if decoded > MAX_DECODED_BYTES:
            limit = f"that is over the {MAX_DECODED_BYTES / 2**30:.1f} GiB limit (MEDHYBRID_MAX_DECODED_BYTES)"
        else:
            limit = f"{where} holds only {available:,} bytes"
        error = TruncatedFileError if where == "its Pixel Data" and needed > available else CorruptPixelDataError
        raise error(
            f"header declares {what}, but {limit}",
            path=path,
            fix="the file is truncated, or its Rows/Columns/NumberOfFrames/BitsAllocated are wrong: re-copy or "
            "re-export it",
        )


def _pixel_bytes(ds: Dataset, path: Path) -> tuple[int, str]:
    """How many bytes of pixel data the file really holds, without reading them: the header pass defers the
    Pixel Data value, so its declared length and offset are compared with the file's size."""
    try:
        size = path.stat().st_size
    except OSError:
        size = 0
    if "PixelData" not in ds:
        return size, "the file"
    element = ds.get_item("PixelData", keep_deferred=True)
    value = getattr(element, "value", None)
    if value is not None:
        return len(value), "its Pixel Data"
    length, offset = getattr(element, "length", 0), getattr(element, "value_tell", None)
    if offset is None or length == 0xFFFFFFFF:
        return size, "the file"
    return max(0, min(length, size - offset)), "its Pixel Data"


def _frame_geometry(ds: Dataset, shared: Dataset | None, per: Dataset | None, path: Path) -> dict[str, Any]:
    """Position, orientation, spacing and rescale of one frame (classic or enhanced multi-frame)."""
    enhanced = shared is not None or per is not None
    pos_item = _functional(shared, per, "PlanePositionSequence") if enhanced else None
    ori_item = _functional(shared, per, "PlaneOrientationSequence") if enhanced else None
    pix_item = _functional(shared, per, "PixelMeasuresSequence") if enhanced else None
    val_item = _functional(shared, per, "PixelValueTransformationSequence") if enhanced else None
    pos_src, ori_src, pix_src, val_src = (
        (pos_item or ds),
        (ori_item or ds),
        (pix_item or ds),
        (val_item or ds),
    )

    position = image_tag(pos_src, "ImagePositionPatient", path, tuple)
    orientation = image_tag(ori_src, "ImageOrientationPatient", path, tuple)
    if position is not None and len(position) != 3:
        raise InvalidTagError(f"ImagePositionPatient has {len(position)} values, expected 3", path=path)
    if orientation is not None and len(orientation) != 6:
        raise InvalidTagError(f"ImageOrientationPatient has {len(orientation)} values, expected 6", path=path)
    spacing, spacing_tag = None, None
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        value = image_tag(pix_src, keyword, path, tuple) or image_tag(ds, keyword, path, tuple)
        if value is not None:
            if len(value) != 2 or min(value) <= 0:
                raise InvalidTagError(f"{keyword} {value} is not two positive numbers", path=path)
            spacing, spacing_tag = (value[0], value[1]), keyword
            break
    return {
        "position": position,
        "orientation": orientation,
        "pixel_spacing": spacing,
        "spacing_tag": spacing_tag,
        "slice_thickness": image_tag(pix_src, "SliceThickness", path, float)
        or image_tag(ds, "SliceThickness", path, float),
        "slope": _nonzero(image_tag(val_src, "RescaleSlope", path, float, 1.0), path),
        "intercept": image_tag(val_src, "RescaleIntercept", path, float, 0.0),
    }


def _nonzero(slope: float, path: Path) -> float:
    if slope == 0:
        raise InvalidTagError(
            "RescaleSlope is 0: every voxel would have one value", path=path, fix="correct RescaleSlope"
        )
    return slope


def safe_metadata(ds: Dataset) -> dict[str, Any]:
    """The whitelisted, PHI-free subset of a data set's attributes."""
    out: dict[str, Any] = {}
    for keyword in SAFE_DICOM_KEYWORDS:
        if keyword in ds and ds[keyword].value not in (None, ""):
            element = ds[keyword]
            value = element.value
            if keyword == "SOPClassUID":
                value = UID(str(value)).name or str(value)
            elif isinstance(value, pydicom.multival.MultiValue):
                value = [str(v) for v in value]
            elif element.VR in ("IS", "DS"):
                try:
                    value = int(value) if element.VR == "IS" else float(value)
                except (TypeError, ValueError):
                    value = str(value)
            elif not isinstance(value, (int, float)):
                value = str(value)
            out[keyword] = value
    return out
