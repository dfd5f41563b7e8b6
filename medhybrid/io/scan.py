"""Scan a folder of studies (DICOM and/or image files, any depth) without letting one bad file stop it.

``scan_folder`` is the engine behind ``medhybrid data scan``; ``load_study`` turns a path (a DICOM
folder or file, or an image file) into the one selected :class:`~medhybrid.io.study.Study`.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medhybrid.errors import AmbiguousSeriesError, InputError, MedHybridError
from medhybrid.io.dicom import DicomSeries, discover_dicom, load_series, read_pixels
from medhybrid.io.dicom_files import FileProblem, iter_files
from medhybrid.io.geometry import IngestOptions
from medhybrid.io.readers import image_format, read_image
from medhybrid.io.select import SelectionRules, select_series
from medhybrid.io.study import Study, Verdict

logger = logging.getLogger(__name__)

# load_study parses each file once and keeps pixel bytes up to this much (then re-reads the rest).
LOAD_CACHE_BYTES = 1 << 30


@dataclass
class ScanReport:
    """Every study and series found under a folder, and every file that was rejected or skipped."""

    root: Path
    studies: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    rejected: list[FileProblem] = field(default_factory=list)
    skipped: list[FileProblem] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        series = [s for group in self.studies.values() for s in group]
        by_verdict = {v.value: sum(s["qc"]["verdict"] == v.value for s in series) for v in Verdict}
        return {
            "studies": len(self.studies),
            "series": len(series),
            **{f"series_{k}": n for k, n in by_verdict.items()},
            "rejected_files": len(self.rejected),
            "skipped_files": len(self.skipped),
        }

    def as_dict(self) -> dict[str, Any]:
        return {
            "root": str(self.root),
            "counts": self.counts(),
            "studies": [{"study_key": key, "series": series} for key, series in self.studies.items()],
            "rejected_files": [p.as_dict() for p in self.rejected],
            "skipped_files": [p.as_dict() for p in self.skipped],
        }


def scan_folder(
    root: Path,
    *,
    options: IngestOptions | None = None,
    decode: bool = True,
    on_step: Callable[[str], None] | None = None,
) -> ScanReport:
    """Find and check everything under ``root``.

    Args:
        decode: also decode every accepted series' pixel data, so truncated or corrupt pixel data is
            caught (slower); ``False`` checks headers and geometry only.
        on_step: called with a short label for each file read (progress reporting).

    Raises:
        InputError: ``root`` does not exist. Nothing else: bad files and series are reported.
    """
    root = Path(root)
    if not root.exists():
        raise InputError("folder not found", path=root, fix="check the path")
    report = ScanReport(root=root)
    dicom_candidates: list[Path] = []
    images: list[Path] = []
    for path in iter_files(root):
        (images if image_format(path) else dicom_candidates).append(path)

    found = discover_dicom(root, options, files=dicom_candidates, on_file=_step(on_step, "header"))
    report.rejected.extend(found.rejected)
    report.skipped.extend(found.skipped)
    for series in found.series:
        if decode:
            if on_step:
                on_step(f"decode {series.modality} x{series.n_slices}")
            _decode_check(series, report)
        report.studies.setdefault(series.study_key, []).append(
            {"source": str(series.headers[0].path.parent), "format": "dicom", **series.summary()}
        )
    for path in images:
        if on_step:
            on_step("image")
        try:
            study = read_image(path)
        except MedHybridError as exc:
            report.rejected.append(FileProblem(path, exc.code, exc.message))
            continue
        report.studies.setdefault(study.key, []).append(
            {"source": str(path), "format": study.source_format, **_image_summary(study)}
        )
    return report


def _decode_check(series: DicomSeries, report: ScanReport) -> None:
    """Decode the series; on failure mark it rejected and list the guilty file.

    A series already rejected for its geometry is decoded file by file instead, so that a corrupt
    file inside it is still named.
    """
    if series.error is not None:
        for path in series.files:
            try:
                read_pixels(path)
            except MedHybridError as exc:
                report.rejected.append(FileProblem(path, exc.code, exc.message))
        return
    try:
        load_series(series)
    except MedHybridError as exc:
        series.error = exc
        series.qc.reject(exc.code, str(exc))
        if exc.path is not None:
            report.rejected.append(FileProblem(exc.path, exc.code, exc.message))


def _image_summary(study: Study) -> dict[str, Any]:
    summary = study.summary()
    return {
        "modality": study.modality,
        "shape": summary["shape"],
        "spacing": summary["spacing"],
        "qc": summary["qc"],
    }


def _step(on_step: Callable[[str], None] | None, label: str) -> Callable[[Path], None] | None:
    if on_step is None:
        return None
    return lambda _path: on_step(label)


def load_study(path: Path, rules: SelectionRules | None = None, options: IngestOptions | None = None) -> Study:
    """Load the one study at ``path``: an image file, a DICOM file, or a folder holding one DICOM study.

    Raises:
        InputError, SeriesSelectionError (no or several matching series, or several studies),
        any DicomError/ImageReadError of the selected series.
    """
    path = Path(path)
    if not path.exists():
        raise InputError("not found", path=path, fix="check the path")
    if path.is_file() and image_format(path):
        return read_image(path)
    found = discover_dicom(path, options, keep_pixels_bytes=LOAD_CACHE_BYTES)
    by_study: dict[str, list[DicomSeries]] = defaultdict(list)
    for series in found.series:
        by_study[series.study_uid].append(series)
    if len(by_study) > 1:
        raise AmbiguousSeriesError(
            f"{len(by_study)} DICOM studies found; load_study takes one study",
            path=path,
            fix="point at one study's folder, or use `medhybrid infer` for a folder of studies",
        )
    if not by_study:
        reasons = "; ".join(f"{p.path.name}: {p.reason}" for p in found.rejected[:5])
        raise InputError(
            "no readable DICOM image series" + (f" ({reasons})" if reasons else ""),
            path=path,
            fix="check that the folder holds DICOM images or a NIfTI/NRRD/MHA/PNG file",
        )
    series = select_series(next(iter(by_study.values())), rules)
    return load_series(series)
