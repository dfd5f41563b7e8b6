"""DICOM folders to validated series and volumes.

``discover_dicom`` walks a folder at any depth, skips junk, groups the files by StudyInstanceUID then
SeriesInstanceUID and gives every series a QC verdict from its headers. ``load_series`` decodes the
pixel data of one series into a :class:`~medhybrid.io.study.Study` (rescale applied, RAS affine).
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset

from medhybrid.errors import CorruptPixelDataError, DicomError, MedHybridError, NotAnImageError
from medhybrid.io.dicom_files import (
    HEADER_TAGS,
    FileProblem,
    SliceHeader,
    iter_files,
    read_dataset,
    slice_headers,
    sniff_dicom,
)
from medhybrid.io.dicom_pixels import HEADER_AND_PIXEL_TAGS, PIXEL_TAGS, decode_frames, stored_value_range
from medhybrid.io.geometry import IngestOptions, SeriesGeometry, series_geometry
from medhybrid.io.study import LPS_TO_RAS, QCReport, Study, Verdict, spacing_from_affine, study_key

logger = logging.getLogger(__name__)

HEADER_TAGS_WITH_PIXEL_LENGTH = [*HEADER_TAGS, "PixelData"]
DEFER_BYTES = 1024


@dataclass
class DicomSeries:
    """One series: its slice headers (sorted along the normal once geometry passed) and its QC."""

    study_uid: str
    series_uid: str
    headers: list[SliceHeader]
    qc: QCReport = field(default_factory=QCReport)
    geometry: SeriesGeometry | None = None
    error: MedHybridError | None = None

    @property
    def modality(self) -> str:
        return self.headers[0].modality

    @property
    def description(self) -> str:
        return str(self.headers[0].safe_metadata.get("SeriesDescription", ""))

    @property
    def n_slices(self) -> int:
        return len(self.headers)

    @property
    def files(self) -> list[Path]:
        return list(dict.fromkeys(h.path for h in self.headers))

    @property
    def shape(self) -> tuple[int, ...]:
        h = self.headers[0]
        return (h.cols, h.rows, len(self.headers)) + ((h.samples,) if h.samples > 1 else ())

    @property
    def spacing(self) -> tuple[float, float, float] | None:
        return spacing_from_affine(self.geometry.affine_lps) if self.geometry else None

    @property
    def study_key(self) -> str:
        return study_key(self.study_uid)

    def summary(self) -> dict[str, Any]:
        """JSON-ready, PHI-free description."""
        return {
            "series_uid": self.series_uid,
            "modality": self.modality,
            "description": self.description,
            "series_number": self.headers[0].safe_metadata.get("SeriesNumber"),
            "n_files": len(self.files),
            "n_slices": self.n_slices,
            "shape": list(self.shape),
            "spacing": [round(s, 6) for s in self.spacing] if self.spacing else None,
            "transfer_syntax": self.headers[0].transfer_syntax,
            "qc": self.qc.as_dict(),
        }


@dataclass
class DicomDiscovery:
    """Everything found under a folder: series, files rejected (with reasons) and files skipped."""

    series: list[DicomSeries] = field(default_factory=list)
    rejected: list[FileProblem] = field(default_factory=list)
    skipped: list[FileProblem] = field(default_factory=list)


def discover_dicom(
    root: Path,
    options: IngestOptions | None = None,
    files: Iterable[Path] | None = None,
    on_file: Callable[[Path], None] | None = None,
    keep_pixels_bytes: int = 0,
) -> DicomDiscovery:
    """Find, parse (headers only), group and check every DICOM series under ``root``.

    Args:
        keep_pixels_bytes: memory budget for keeping parsed files with their pixel bytes, so that
            :func:`load_series` decodes them without parsing each file a second time (single pass).
            Files beyond the budget are parsed for headers only and re-read when loaded.

    Never raises for a bad file or series: problems land in ``rejected`` / the series' QC.
    """
    out = DicomDiscovery()
    headers: list[SliceHeader] = []
    metadata_cache: dict[str, dict[str, Any]] = {}
    budget = keep_pixels_bytes
    for path in files if files is not None else iter_files(root):
        if on_file is not None:
            on_file(path)
        kind = sniff_dicom(path)
        if kind == "no":
            out.skipped.append(FileProblem(path, "not_dicom", "not a DICOM file"))
            continue
        if kind == "dicomdir":
            out.skipped.append(FileProblem(path, "dicomdir", "DICOMDIR index (files are found by walking)"))
            continue
        try:
            keep = budget > 0
            # the header pass defers Pixel Data (its length is checked against the file, not read) unless the
            # file is kept for a single-pass load
            ds = read_dataset(
                path,
                tags=HEADER_AND_PIXEL_TAGS if keep else HEADER_TAGS_WITH_PIXEL_LENGTH,
                forced=kind == "maybe",
                defer_size=None if keep else DEFER_BYTES,
            )
            file_headers = slice_headers(ds, path, metadata_cache)
            if keep and "PixelData" in ds:
                budget -= len(ds.PixelData or b"")
                for h in file_headers:
                    h.dataset = ds
            headers.extend(file_headers)
        except NotAnImageError as exc:
            out.skipped.append(FileProblem(path, exc.code, exc.message))
        except MedHybridError as exc:
            out.rejected.append(FileProblem(path, exc.code, exc.message))
    headers, duplicates, copies = drop_duplicates(headers)
    out.skipped.extend(duplicates)
    out.series = group_series(headers, options, copies)
    return out


def drop_duplicates(headers: list[SliceHeader]) -> tuple[list[SliceHeader], list[FileProblem], Counter[Path]]:
    """Drop copies of an instance already seen: files with the same SOPInstanceUID whose bytes are identical
    (a second copy in another folder), or a prefix of the other's (a partial copy). Different files that share
    a SOPInstanceUID are kept: the geometry checks name them if they collide.

    Returns:
        the headers kept, the copies dropped (as skipped files), and how many copies each kept file had.
    """
    kept: list[SliceHeader] = []
    first_file: dict[str, Path] = {}
    dropped: dict[Path, FileProblem] = {}
    copies: Counter[Path] = Counter()
    for h in headers:
        if h.path in dropped:
            continue
        original = first_file.setdefault(h.sop_uid, h.path) if h.sop_uid else h.path
        if original != h.path:
            relation = _copy_relation(original, h.path)
            if relation is not None:
                if relation == "shorter":  # the first one seen was the partial copy: keep the whole file
                    kept = [k for k in kept if k.path != original]
                    dropped[original] = FileProblem(original, "duplicate", f"partial copy of {h.path}")
                    first_file[h.sop_uid] = h.path
                    copies[h.path] += 1 + copies.pop(original, 0)
                else:
                    copies[original] += 1
                    what = "identical copy" if relation == "same" else "partial copy"
                    dropped[h.path] = FileProblem(h.path, "duplicate", f"{what} of {original} (same SOPInstanceUID)")
                    continue
        kept.append(h)
    return kept, list(dropped.values()), copies


def _copy_relation(a: Path, b: Path) -> str | None:
    """``same`` when b's bytes equal a's, ``prefix`` when b is a truncated copy of a, ``shorter`` when a is a
    truncated copy of b, else None. Only called for files that share a SOPInstanceUID."""
    try:
        da, db = a.read_bytes(), b.read_bytes()
    except OSError:
        return None
    if da == db:
        return "same"
    if da.startswith(db):
        return "prefix"
    if db.startswith(da):
        return "shorter"
    return None


def group_series(
    headers: list[SliceHeader], options: IngestOptions | None = None, copies: Mapping[Path, int] | None = None
) -> list[DicomSeries]:
    """Group slice headers by (StudyInstanceUID, SeriesInstanceUID) and check each group's geometry.

    Args:
        copies: how many copies :func:`drop_duplicates` dropped of each file; a series says so in its QC.
    """
    groups: dict[tuple[str, str], list[SliceHeader]] = defaultdict(list)
    notes: dict[tuple[str, str], list[str]] = defaultdict(list)
    copies = copies or {}
    for h in headers:
        series_uid = h.series_uid or f"no-series-uid:{h.path.parent}"
        study_uid = h.study_uid or f"no-study-uid:{series_uid}"
        key = (study_uid, series_uid)
        if not h.series_uid:
            notes[key].append("no SeriesInstanceUID: files grouped by folder")
        groups[key].append(h)
    series = []
    for (study_uid, series_uid), members in groups.items():
        s = DicomSeries(study_uid=study_uid, series_uid=series_uid, headers=members)
        for note in sorted(set(notes[(study_uid, series_uid)])):
            s.qc.warn("no_series_uid", note)
        n_copies = sum(copies.get(f, 0) for f in s.files)
        if n_copies:
            s.qc.warn("duplicate_files", f"{n_copies} duplicate copies of this series' files ignored (same SOP UID)")
        check_series(s, options)
        series.append(s)
    series.sort(key=lambda s: (s.study_uid, _series_number(s), s.series_uid))
    return series


def _series_number(series: DicomSeries) -> int:
    value = series.headers[0].safe_metadata.get("SeriesNumber")
    return value if isinstance(value, int) else -1  # absent or unparseable numbers sort first


def check_series(series: DicomSeries, options: IngestOptions | None = None) -> None:
    """Run the geometry checks; on success sort the headers, on failure record a reject reason."""
    seen: set[tuple[str, str]] = set()
    for h in series.headers:
        for note in h.notes:
            if (note.code, note.message) not in seen:
                seen.add((note.code, note.message))
                series.qc.add(note.level, note.code, note.message)
    try:
        geometry = series_geometry(series.headers, options)
    except DicomError as exc:
        series.error = exc
        series.qc.reject(exc.code, str(exc))
        return
    series.geometry = geometry
    series.headers = [series.headers[i] for i in geometry.order]
    for reason in geometry.reasons:
        series.qc.add(reason.level, reason.code, reason.message)
    if series.headers[0].samples > 1:
        series.qc.warn("colour", f"colour image ({series.headers[0].photometric}), kept as RGB channels")
    if series.n_slices == 1 and series.headers[0].n_frames == 1:
        series.qc.add(Verdict.OK, "single_slice", "one slice: a 2D image")


def read_pixels(path: Path, parsed: Dataset | None = None) -> tuple[Dataset, np.ndarray]:
    """Parse ``path`` for its pixel data (unless ``parsed`` already holds it) and decode all frames.

    Raises:
        NotDicomError, TruncatedFileError, CorruptPixelDataError, UnsupportedTransferSyntaxError
    """
    ds = parsed or read_dataset(path, tags=PIXEL_TAGS, forced=sniff_dicom(path) == "maybe")
    return ds, decode_frames(ds, path)


FLOAT32_MAX = float(np.finfo(np.float32).max)


def _check_rescale(
    frames: np.ndarray, members: list[tuple[int, SliceHeader]], lo: float, hi: float, path: Path
) -> None:
    """Raise CorruptPixelDataError when rescaled voxels would not be finite float32 values: float pixel data
    holding NaN/inf, or a slope/intercept that overflows (checked on the stored range, not voxel by voxel)."""
    if frames.dtype.kind == "f":
        if not np.isfinite(frames).all():
            raise CorruptPixelDataError(
                "the float pixel data holds NaN or infinite values", path=path, fix="re-export the image"
            )
        lo, hi = float(frames.min()), float(frames.max())
    for _, h in members:
        if max(abs(lo), abs(hi)) * abs(h.slope) + abs(h.intercept) >= FLOAT32_MAX:
            raise CorruptPixelDataError(
                f"RescaleSlope {h.slope:g} / RescaleIntercept {h.intercept:g} overflow the voxel values",
                path=path,
                fix="correct RescaleSlope/RescaleIntercept",
            )


def load_series(series: DicomSeries) -> Study:
    """Decode the pixel data of a checked series into a Study.

    The volume is float32 with each slice's RescaleSlope/Intercept applied (CT in HU); MONOCHROME1
    images are inverted so that higher always means brighter.

    Raises:
        SeriesGeometryError (the series failed its checks), CorruptPixelDataError, NotAnImageError,
        UnsupportedTransferSyntaxError, NotDicomError, TruncatedFileError
    """
    if series.error is not None:
        raise series.error
    assert series.geometry is not None  # set by check_series whenever error is None
    first = series.headers[0]
    n = len(series.headers)
    channels = (first.samples,) if first.samples > 1 else ()
    volume = np.empty((n, first.rows, first.cols, *channels), dtype=np.float32)
    by_file: dict[Path, list[tuple[int, SliceHeader]]] = defaultdict(list)
    for index, h in enumerate(series.headers):
        by_file[h.path].append((index, h))
    inverted = False
    for path, members in by_file.items():
        ds, frames = read_pixels(path, members[0][1].dataset)
        if frames.shape[1:3] != (first.rows, first.cols):
            raise CorruptPixelDataError(
                f"decoded frames are {frames.shape[1:3]}, header says {(first.rows, first.cols)}", path=path
            )
        lo, hi = stored_value_range(ds)
        _check_rescale(frames, members, lo, hi, path)
        for index, h in members:
            out = volume[index]
            # rescale in float32, one pass when the slope is 1 (the usual CT case)
            if h.slope == 1.0:
                np.add(frames[h.frame], np.float32(h.intercept), out=out, dtype=np.float32, casting="unsafe")
            else:
                np.multiply(frames[h.frame], np.float32(h.slope), out=out, dtype=np.float32, casting="unsafe")
                out += np.float32(h.intercept)
            if h.photometric == "MONOCHROME1":
                # MONOCHROME1 shows low values bright; flip within the rescaled stored range
                out *= -1.0
                out += (lo + hi) * h.slope + 2 * h.intercept
                inverted = True
    qc = QCReport(list(series.qc.reasons))
    if inverted:
        qc.add(Verdict.OK, "monochrome1_inverted", "MONOCHROME1 inverted so that higher values are brighter")
    # (K, J, I[, C]) C-order -> (I, J, K[, C]) view, no copy
    array = volume.transpose(2, 1, 0, 3) if channels else volume.transpose(2, 1, 0)
    metadata = dict(first.safe_metadata)
    return Study(
        key=series.study_key,
        array=array,
        affine=LPS_TO_RAS @ series.geometry.affine_lps,
        modality=first.modality,
        source=first.path.parent,
        source_format="dicom",
        metadata=metadata,
        qc=qc,
        series_uid=series.series_uid,
    )
