"""Finding the studies of an ``infer`` input: a folder at any depth, one study, or a manifest; and the
options of a run. A study whose series cannot be chosen is a task carrying its error (reported, not
raised), so one bad study never stops the batch."""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from medhybrid.errors import InputError, MedHybridError
from medhybrid.io.dicom import DicomSeries, discover_dicom
from medhybrid.io.dicom_files import FileProblem, iter_files, sniff_dicom
from medhybrid.io.geometry import IngestOptions
from medhybrid.io.manifest import read_manifest
from medhybrid.io.readers import image_format
from medhybrid.io.select import SelectionRules, select_for_model
from medhybrid.io.study import study_key

logger = logging.getLogger(__name__)

# Image files that are label maps, not studies, when a folder is scanned (synth, MSD and most exports).
DEFAULT_EXCLUDE = ("*_mask.*", "*_seg.*", "*_label.*", "*_labels.*", "*_labelmap.*")


@dataclass
class StudyTask:
    """One study to infer: where it is, and (DICOM) the selected series, or why none could be chosen."""

    key: str
    source: Path
    kind: str  # "dicom" or "image"
    series: DicomSeries | None = None
    manifest_id: str | None = None
    error: MedHybridError | None = None
    out_of_scope: str | None = None  # no series of the model's modality: NOT ASSESSED (io/select.py)


@dataclass
class InferOptions:
    tta: bool = False
    device: str = "auto"
    overwrite: bool = False
    force: bool = False  # assess studies outside the model's scope anyway (the report says so)
    include_phi: bool = False
    threshold: float | None = None
    rules: SelectionRules = field(default_factory=SelectionRules)
    ingest: IngestOptions | None = None
    exclude: tuple[str, ...] = DEFAULT_EXCLUDE
    dicom_outputs: bool = True


# --- finding studies -------------------------------------------------------------------------------
def find_studies(
    input_path: Path, options: InferOptions, modalities: tuple[str, ...] = ()
) -> tuple[list[StudyTask], list[FileProblem]]:
    """Every study under ``input_path`` (a folder at any depth, one file, or a manifest ``.csv``).

    ``modalities``: the model's; they choose among a DICOM study's series where the rules leave several
    (:func:`~medhybrid.io.select.select_for_model`).

    Returns the tasks (a study whose series cannot be chosen carries its error) and the files that
    were rejected while reading headers.

    Raises:
        InputError: ``input_path`` does not exist; ManifestError for a bad manifest.
    """
    input_path = Path(input_path)
    if not input_path.exists():
        raise InputError("input not found", path=input_path, fix="give a folder of studies, a study, or a manifest")
    if input_path.is_file() and input_path.suffix.lower() == ".csv":
        return _from_manifest(input_path, options, modalities)
    if input_path.is_file() and image_format(input_path):
        return [_image_task(input_path)], []
    files = [input_path] if input_path.is_file() else list(iter_files(input_path))
    images = [p for p in files if image_format(p) and not _excluded(p, options.exclude)]
    dicom_files = [p for p in files if not image_format(p)]
    tasks, problems = _dicom_tasks(input_path, dicom_files, options, modalities=modalities)
    tasks += [_image_task(p) for p in images]
    return tasks, problems


def follow_dicomdir(input_path: Path) -> Path:
    """A DICOMDIR given as the input stands for the media it indexes: its folder, which is walked (every file
    a DICOMDIR references lies under it; walking also finds files its records miss)."""
    if input_path.is_file() and (input_path.name.upper() == "DICOMDIR" or sniff_dicom(input_path) == "dicomdir"):
        logger.info("%s is a DICOMDIR: reading the media folder it indexes, %s", input_path, input_path.parent)
        return input_path.parent
    return input_path


def raise_no_studies(input_path: Path, rejected: list[FileProblem]) -> None:
    """A run that finds nothing to report says so, and why, instead of reporting 0 studies."""
    reasons = "; ".join(f"{p.path.name}: {p.reason}" for p in rejected[:3])
    more = f" (+{len(rejected) - 3} more)" if len(rejected) > 3 else ""
    raise InputError(
        "no study found"
        + (f": {len(rejected)} file(s) rejected ({reasons}{more})" if rejected else " (no DICOM or image files)"),
        path=input_path,
        fix="give a folder of DICOM studies or NIfTI/NRRD/MHA/PNG images, one study, or a manifest .csv",
    )


def _excluded(path: Path, patterns: tuple[str, ...]) -> bool:
    return any(path.match(p) for p in patterns)


def _image_task(path: Path, manifest_id: str | None = None) -> StudyTask:
    return StudyTask(key=study_key(str(path.resolve())), source=path, kind="image", manifest_id=manifest_id)


def _dicom_tasks(
    root: Path,
    files: list[Path],
    options: InferOptions,
    manifest_id: str | None = None,
    modalities: tuple[str, ...] = (),
) -> tuple[list[StudyTask], list[FileProblem]]:
    found = discover_dicom(root, options.ingest, files=files)
    by_study: dict[str, list[DicomSeries]] = defaultdict(list)
    for series in found.series:
        by_study[series.study_key].append(series)
    tasks = []
    for key, group in by_study.items():
        task = StudyTask(key=key, source=group[0].headers[0].path.parent, kind="dicom", manifest_id=manifest_id)
        try:
            choice = select_for_model(group, options.rules, modalities)
            task.series, task.out_of_scope = choice.series, choice.out_of_scope
            task.source = task.series.headers[0].path.parent
        except MedHybridError as exc:
            task.error = exc
        tasks.append(task)
    return tasks, list(found.rejected)


def _from_manifest(
    path: Path, options: InferOptions, modalities: tuple[str, ...] = ()
) -> tuple[list[StudyTask], list[FileProblem]]:
    manifest = read_manifest(path)
    tasks: list[StudyTask] = []
    problems: list[FileProblem] = []
    for row in manifest.rows:
        image = Path(row.image)
        if image.is_file() and image_format(image):
            tasks.append(_image_task(image, row.study_id))
            continue
        if not image.exists():
            tasks.append(
                StudyTask(
                    key=study_key(str(image)),
                    source=image,
                    kind="image",
                    manifest_id=row.study_id,
                    error=InputError("image not found", path=image, fix="fix the manifest row"),
                )
            )
            continue
        files = [image] if image.is_file() else list(iter_files(image))
        found, rejected = _dicom_tasks(image, files, options, row.study_id, modalities)
        problems += rejected
        if len(found) != 1:
            tasks.append(
                StudyTask(
                    key=study_key(str(image.resolve())),
                    source=image,
                    kind="dicom",
                    manifest_id=row.study_id,
                    error=InputError(
                        f"{len(found)} DICOM studies at a manifest row's image (one expected)",
                        path=image,
                        fix="point the row at one study's folder",
                    ),
                )
            )
        else:
            tasks += found
    return tasks, problems
