"""``medhybrid infer``: a folder of studies (or one study, or a manifest) to one report folder per study.

Layout of ``OUT``::

    index.html, summary.csv, infer.log
    <study_key>/report.json, report.html, thumb.png, mask.nii.gz,
                saliency_gradcam.nii.gz, saliency_attention.nii.gz, seg.dcm, sr.dcm (DICOM input)

Robustness: studies are found first (DICOM headers only, grouped by study, one series chosen by the
selection rules); each is then loaded, inferred and written on its own, and a failure is recorded (in
``summary.csv`` and ``index.html``, with its typed error) without stopping the others. A study's files
are written into ``OUT/.partial-<key>/`` and the folder is renamed to ``OUT/<key>/`` only when all of
them exist, so a killed run leaves no half report; partial folders are removed by the next run, which
skips studies whose folder is complete unless ``overwrite``.

Patient data: folder names are pseudonymous study keys; no PatientName, PatientID or birth date is read
unless ``include_phi`` (then they go into report.json/html and the DICOM SEG/SR keep them).
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import logging
import os
import queue
import shutil
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medhybrid import __version__
from medhybrid.errors import InferenceError, InputError, MedHybridError
from medhybrid.infer.predictor import Prediction, Predictor, Prepared
from medhybrid.infer.render import DisplayFrame, index_html, render_panels, report_html, window_for
from medhybrid.infer.report import (
    Lesion,
    ModelInfo,
    OperatingPoint,
    Outputs,
    QCFlag,
    Saliency,
    Source,
    Structure,
    StudyReport,
    jsonable,
    measure_lesions,
)
from medhybrid.infer.resample import argmax_labels, to_native_many, to_uint8
from medhybrid.io.dicom import DicomSeries, discover_dicom, load_series
from medhybrid.io.dicom_files import FileProblem, iter_files
from medhybrid.io.geometry import IngestOptions
from medhybrid.io.manifest import read_manifest
from medhybrid.io.readers import image_format, read_geometry, read_image
from medhybrid.io.select import SelectionRules, select_series
from medhybrid.io.study import Study, study_key
from medhybrid.io.writers import atomic_write_bytes, nifti_bytes

logger = logging.getLogger(__name__)

REPORT_FILE = "report.json"
PATIENT_KEYS = ("PatientName", "PatientID", "PatientBirthDate")  # read only with --include-phi
# Below this share of the scan inside the model's input, the report warns that the rest was not assessed.
FIELD_OF_VIEW_WARN = 0.95
PARTIAL_PREFIX = ".partial-"
OLD_PREFIX = ".old-"
# Image files that are label maps, not studies, when a folder is scanned (synth, MSD and most exports).
DEFAULT_EXCLUDE = ("*_mask.*", "*_seg.*", "*_label.*", "*_labels.*", "*_labelmap.*")
SUMMARY_FIELDS = (
    "rank",
    "study_key",
    "status",
    "probability",
    "decision",
    "threshold",
    "lesion_ml",
    "lesion_components",
    "qc_verdict",
    "source",
    "manifest_id",
    "report",
    "error",
    "reason",
)
SALIENCY_DESCRIPTIONS = {
    "gradcam": "Grad-CAM on the encoder's last stage; uint8 with scl_slope 1/255, so readers see [0, 1]",
    "attention": "attention rollout of the Transformer; uint8 with scl_slope 1/255, so readers see [0, 1]",
}


@dataclass
class StudyTask:
    """One study to infer: where it is, and (DICOM) the selected series, or why none could be chosen."""

    key: str
    source: Path
    kind: str  # "dicom" or "image"
    series: DicomSeries | None = None
    manifest_id: str | None = None
    error: MedHybridError | None = None


@dataclass
class InferOptions:
    tta: bool = False
    device: str = "auto"
    overwrite: bool = False
    include_phi: bool = False
    threshold: float | None = None
    rules: SelectionRules = field(default_factory=SelectionRules)
    ingest: IngestOptions | None = None
    exclude: tuple[str, ...] = DEFAULT_EXCLUDE
    dicom_outputs: bool = True


@dataclass
class InferResult:
    out: Path
    done: list[dict[str, Any]]
    skipped: list[str]
    failed: list[dict[str, Any]]
    seconds: float
    timings: dict[str, float]

    @property
    def index(self) -> Path:
        return self.out / "index.html"


# --- finding studies -------------------------------------------------------------------------------
def find_studies(input_path: Path, options: InferOptions) -> tuple[list[StudyTask], list[FileProblem]]:
    """Every study under ``input_path`` (a folder at any depth, one file, or a manifest ``.csv``).

    Returns the tasks (a study whose series cannot be chosen carries its error) and the files that
    were rejected while reading headers.

    Raises:
        InputError: ``input_path`` does not exist; ManifestError for a bad manifest.
    """
    input_path = Path(input_path)
    if not input_path.exists():
        raise InputError("input not found", path=input_path, fix="give a folder of studies, a study, or a manifest")
    if input_path.is_file() and input_path.suffix.lower() == ".csv":
        return _from_manifest(input_path, options)
    if input_path.is_file() and image_format(input_path):
        return [_image_task(input_path)], []
    files = [input_path] if input_path.is_file() else list(iter_files(input_path))
    images = [p for p in files if image_format(p) and not _excluded(p, options.exclude)]
    dicom_files = [p for p in files if not image_format(p)]
    tasks, problems = _dicom_tasks(input_path, dicom_files, options)
    tasks += [_image_task(p) for p in images]
    return tasks, problems


def _excluded(path: Path, patterns: tuple[str, ...]) -> bool:
    return any(path.match(p) for p in patterns)


def _image_task(path: Path, manifest_id: str | None = None) -> StudyTask:
    return StudyTask(key=study_key(str(path.resolve())), source=path, kind="image", manifest_id=manifest_id)


def _dicom_tasks(
    root: Path, files: list[Path], options: InferOptions, manifest_id: str | None = None
) -> tuple[list[StudyTask], list[FileProblem]]:
    found = discover_dicom(root, options.ingest, files=files)
    by_study: dict[str, list[DicomSeries]] = defaultdict(list)
    for series in found.series:
        by_study[series.study_key].append(series)
    tasks = []
    for key, group in by_study.items():
        task = StudyTask(key=key, source=group[0].headers[0].path.parent, kind="dicom", manifest_id=manifest_id)
        try:
            task.series = select_series(group, options.rules)
            task.source = task.series.headers[0].path.parent
        except MedHybridError as exc:
            task.error = exc
        tasks.append(task)
    return tasks, list(found.rejected)


def _from_manifest(path: Path, options: InferOptions) -> tuple[list[StudyTask], list[FileProblem]]:
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
        found, rejected = _dicom_tasks(image, files, options, row.study_id)
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


# --- the run ---------------------------------------------------------------------------------------
def run_inference(
    input_path: Path,
    model: Path,
    out: Path,
    options: InferOptions | None = None,
    on_study: Callable[[dict[str, Any]], None] | None = None,
) -> InferResult:
    """Infer every study under ``input_path`` with the model at ``model`` (run folder or checkpoint).

    Three stages overlap, like a data loader: a thread loads and preprocesses the next study while the
    model works on the current one (in this thread), and another thread maps the previous result back
    to the scan and writes its files. The studies in flight are bounded by :data:`INFLIGHT_VOXELS`
    (a study larger than that runs alone), so memory stays flat however many studies there are.

    Args:
        on_study: called after each study with its summary row (also for skipped and failed studies).

    Raises:
        InputError, CheckpointError, InferenceError: the run cannot start (nothing is written then,
        beyond the output folder). Per-study problems never raise: they are recorded.
    """
    options = options or InferOptions()
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InferenceError("output exists and is not a folder", path=out, fix="choose another --out")
    predictor = Predictor(model, device=options.device, tta=options.tta, threshold=options.threshold)
    tasks, rejected = find_studies(input_path, options)
    out.mkdir(parents=True, exist_ok=True)
    _clean_partials(out)
    t_start = time.perf_counter()
    book = _Book(out, predictor, Path(input_path), on_study, run_key(predictor, options))
    with _file_log(out / "infer.log"):
        logger.info(
            "infer: %d studies under %s with %s (threshold %.3f, %s)",
            len(tasks),
            input_path,
            predictor.model_name,
            predictor.threshold,
            predictor.operating_point.get("method"),
        )
        for problem in rejected:
            logger.info("rejected file %s: %s", problem.path, problem.reason)
        todo = _plan(tasks, out, options, book)
        _Pipeline(predictor, out, options, book, Path(input_path)).run(todo)
        book.write_summary()
    seconds = time.perf_counter() - t_start
    return InferResult(out, book.rows, book.skipped, book.failed, seconds, dict(book.totals))


# Voxels of the studies loaded and not yet written (native volume, outputs): a bound on memory. A study
# larger than this runs alone.
INFLIGHT_VOXELS = 48 * 1024 * 1024


class _Book:
    """The run's results (written by the writer thread; read by the main thread after it ends)."""

    def __init__(
        self,
        out: Path,
        predictor: Predictor,
        input_path: Path,
        on_study: Callable[[dict[str, Any]], None] | None,
        run_key: str,
    ) -> None:
        self.out, self.predictor, self.input_path, self.on_study = out, predictor, input_path, on_study
        self.run_key = run_key
        self.rows: list[dict[str, Any]] = []
        self.failed: list[dict[str, Any]] = []
        self.skipped: list[str] = []
        self.totals: dict[str, float] = defaultdict(float)

    def done(self, row: dict[str, Any], timings: dict[str, float] | None = None) -> None:
        self.rows.append(row)
        for k, v in (timings or {}).items():
            self.totals[k] += v
        _notify(self.on_study, row)

    def fail(self, row: dict[str, Any]) -> None:
        self.failed.append(row)
        _notify(self.on_study, row)

    def write_summary(self) -> None:
        _write_summary(self.out, self.rows, self.failed, self.predictor, self.input_path)


def _plan(tasks: list[StudyTask], out: Path, options: InferOptions, book: _Book) -> list[StudyTask]:
    """Tasks to run; finished studies are skipped (unless ``overwrite``), duplicates marked."""
    todo: list[StudyTask] = []
    seen: set[str] = set()
    for task in tasks:
        if task.key in seen:
            task.error = InputError("the same study was found twice; reported once", path=task.source)
        seen.add(task.key)
        final = out / task.key
        if task.error is None and (final / REPORT_FILE).is_file() and not options.overwrite:
            row = _row_from_report(final / REPORT_FILE, book.run_key)
            if row is not None:
                book.skipped.append(task.key)
                book.rows.append(row)
                _notify(book.on_study, {**row, "status": "skipped"})
                continue
        todo.append(task)
    return todo


@dataclass
class _Item:
    """One study moving through the pipeline."""

    task: StudyTask
    source: str
    voxels: int = 0
    study: Study | None = None
    prepared: Prepared | None = None
    pred: Prediction | None = None
    failure: tuple[str, str] | None = None  # (error code, reason)
    t_load: float = 0.0


class _Pipeline:
    """Loader thread -> model (this thread) -> writer thread, with bounded queues (see run_inference)."""

    def __init__(self, predictor: Predictor, out: Path, options: InferOptions, book: _Book, input_path: Path) -> None:
        self.predictor, self.out, self.options, self.book, self.input_path = predictor, out, options, book, input_path
        self.loaded: queue.Queue[_Item | None] = queue.Queue(maxsize=1)
        self.inferred: queue.Queue[_Item | None] = queue.Queue(maxsize=1)
        self.inflight = 0
        self.inflight_cv = threading.Condition()
        self.stop = threading.Event()

    def run(self, tasks: list[StudyTask]) -> None:
        loader = threading.Thread(target=self._load_all, args=(tasks,), name="medhybrid-load", daemon=True)
        writer = threading.Thread(target=self._write_all, name="medhybrid-write", daemon=True)
        loader.start()
        writer.start()
        try:
            while (item := self.loaded.get()) is not None:
                if item.failure is None:
                    assert item.prepared is not None
                    try:
                        item.pred = self.predictor.run(item.prepared)
                    except Exception as exc:  # noqa: BLE001 - recorded per study, the batch goes on
                        item.failure = _describe(exc, item)
                    item.prepared = None
                self._hand_to_writer(item, writer)
        finally:
            # stop the loader (it may wait for memory or for room in its queue), then let the writer finish
            self.stop.set()
            with self.inflight_cv:
                self.inflight_cv.notify_all()
            while loader.is_alive():
                with contextlib.suppress(queue.Empty):
                    self.loaded.get(timeout=0.1)
            if writer.is_alive():
                self._hand_to_writer(None, writer)
                writer.join()

    def _hand_to_writer(self, item: _Item | None, writer: threading.Thread) -> None:
        while True:
            try:
                self.inferred.put(item, timeout=0.5)
                return
            except queue.Full:
                if not writer.is_alive():
                    raise InferenceError(
                        "the writer stopped unexpectedly (see infer.log)", path=self.out, fix="rerun to resume"
                    ) from None

    # --- loader ------------------------------------------------------------------------------------
    def _load_all(self, tasks: list[StudyTask]) -> None:
        try:
            for task in tasks:
                if self.stop.is_set():
                    break
                item = _Item(task, _relative(task.source, self.input_path), voxels=_voxels(task))
                self._reserve(item.voxels)
                t0 = time.perf_counter()
                try:
                    if task.error is not None:
                        raise task.error
                    item.study = load_series(task.series) if task.series is not None else read_image(task.source)
                    item.t_load = time.perf_counter() - t0
                    _check_dims(item.study, self.predictor, task)
                    item.prepared = self.predictor.preprocess(item.study)
                except Exception as exc:  # noqa: BLE001 - recorded per study, the batch goes on
                    item.failure = _describe(exc, item)
                    item.study = None
                self.loaded.put(item)
        finally:
            self.loaded.put(None)

    def _reserve(self, voxels: int) -> None:
        with self.inflight_cv:
            self.inflight_cv.wait_for(
                lambda: self.stop.is_set() or self.inflight == 0 or self.inflight + voxels <= INFLIGHT_VOXELS
            )
            self.inflight += voxels

    def _release(self, voxels: int) -> None:
        with self.inflight_cv:
            self.inflight -= voxels
            self.inflight_cv.notify_all()

    # --- writer ------------------------------------------------------------------------------------
    def _write_all(self) -> None:
        while (item := self.inferred.get()) is not None:
            try:
                if item.failure is None:
                    try:
                        report, timings = _finish(item, self.predictor, self.out, self.options, self.book.run_key)
                    except Exception as exc:  # noqa: BLE001 - recorded per study, the batch goes on
                        item.failure = _describe(exc, item)
                    else:
                        logger.info(
                            "study %s: score %s %s (%.2f s)",
                            item.task.key,
                            "n/a" if report.probability is None else f"{report.probability:.3f}",
                            report.decision or "(no verdict)",
                            timings["total"],
                        )
                        self.book.done(_row(report), timings)
                if item.failure is not None:
                    self.book.fail(_failure(item.task, item.source, *item.failure))
                try:
                    self.book.write_summary()
                except OSError as exc:  # e.g. disk full: the study folders are what matter; retried next study
                    logger.error("cannot write summary.csv/index.html: %s", exc)
            finally:
                item.study = item.pred = None
                self._release(item.voxels)


def _describe(exc: Exception, item: _Item) -> tuple[str, str]:
    """A failure's (code, reason), logged; unexpected exception types keep their traceback in the log."""
    if isinstance(exc, MedHybridError):
        logger.warning("study %s failed: %s", item.task.key, exc)
        return exc.code, str(exc)
    logger.error("study %s failed unexpectedly", item.task.key, exc_info=exc)
    return type(exc).__name__, str(exc)[:300]


def _voxels(task: StudyTask) -> int:
    """Voxels of a study before loading it (headers only); 0 when unknown."""
    if task.series is not None:
        first = task.series.headers[0]
        return first.rows * first.cols * len(task.series.headers) * max(first.samples, 1)
    if task.error is None:
        try:
            shape, _ = read_geometry(task.source)
            return int(np.prod(shape))
        except MedHybridError:
            return 0
    return 0


def _notify(on_study: Callable[[dict[str, Any]], None] | None, row: dict[str, Any]) -> None:
    if on_study is not None:
        on_study(row)


def _failure(task: StudyTask, source: str, code: str, reason: str) -> dict[str, Any]:
    return {
        "study_key": task.key,
        "status": "failed",
        "source": source,
        "manifest_id": task.manifest_id or "",
        "error": code,
        "reason": reason,
    }


def _relative(path: Path, root: Path) -> str:
    try:
        base = root if root.is_dir() else root.parent
        return str(Path(path).resolve().relative_to(base.resolve())) or "."
    except ValueError:
        return str(path)


@contextlib.contextmanager
def _file_log(path: Path) -> Iterator[None]:
    """INFO and above from medhybrid also go to ``path`` for the duration (the console keeps its level)."""
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.INFO)
    log = logging.getLogger("medhybrid")
    level = log.level
    log.addHandler(handler)
    if log.getEffectiveLevel() > logging.INFO:
        log.setLevel(logging.INFO)
    try:
        yield
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
        handler.close()


def _clean_partials(out: Path) -> None:
    """Remove what a killed run left: partial study folders, replaced folders, temp files."""
    for entry in out.iterdir():
        if entry.name.startswith((PARTIAL_PREFIX, OLD_PREFIX)) and entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        elif entry.name.startswith(".") and entry.name.endswith(".tmp") and entry.is_file():
            entry.unlink(missing_ok=True)


# --- one study -------------------------------------------------------------------------------------
def _finish(
    item: _Item, predictor: Predictor, out: Path, options: InferOptions, key: str
) -> tuple[StudyReport, dict[str, float]]:
    """Map the prediction back to the scan, measure, write every file, move the study folder into place."""
    task, study, pred = item.task, item.study, item.pred
    assert study is not None and pred is not None
    t1 = time.perf_counter()
    maps: list[tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor], type]] = [
        (v, to_uint8, np.uint8) for v in pred.saliency.values()
    ]
    if pred.seg_probs is not None:
        maps.append((pred.seg_probs, argmax_labels, np.uint8))
    coverage: list[float] = []
    native = to_native_many(maps, pred.affine, pred.native_affine, study.spatial_shape, coverage=coverage)
    saliency = dict(zip(pred.saliency, native, strict=False))
    labels = native[-1] if pred.seg_probs is not None else None
    t_resample = time.perf_counter() - t1
    partial = out / f"{PARTIAL_PREFIX}{task.key}"
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir()
    t2 = time.perf_counter()
    report = _build_report(task, study, pred, predictor, labels, saliency, item.source, options)
    report.run_key = key
    if coverage and coverage[0] < FIELD_OF_VIEW_WARN:
        report.qc.append(
            QCFlag(
                level="warn",
                code="partial_field_of_view",
                message=f"the model saw {coverage[0]:.1%} of the scan (its input is the training crop "
                f"{predictor.data_cfg.spatial_size} at {predictor.data_cfg.spacing} mm); the rest was not assessed",
            )
        )
        report.qc_verdict = "warn" if report.qc_verdict == "ok" else report.qc_verdict
    _write_outputs(partial, task, study, report, predictor, labels, saliency, options)
    timings = {
        "load": item.t_load,
        "preprocess": pred.timings["preprocess"],
        "model": pred.timings["model"],
        "resample": t_resample,
        "write": time.perf_counter() - t2,
    }
    timings["total"] = sum(timings.values())
    report.timings_s = {k: round(v, 4) for k, v in timings.items()}
    atomic_write_bytes(partial / REPORT_FILE, report.to_json())
    _commit(partial, out / task.key)
    return report, timings


def _check_dims(study: Study, predictor: Predictor, task: StudyTask) -> None:
    if predictor.data_cfg.spatial_dims == 2 and not study.is_2d:
        raise InferenceError(
            f"the model is 2D and the study is a volume of {study.spatial_shape[2]} slices",
            path=task.source,
            fix="use a 3D model for volumes, or give single-slice images",
        )


def _commit(partial: Path, final: Path) -> None:
    """Move a complete study folder into place (replacing an old one only after the new one exists)."""
    if final.exists():
        old = final.with_name(f"{OLD_PREFIX}{final.name}")
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
        os.replace(partial, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(partial, final)


def _qc_flags(study: Study, predictor: Predictor) -> list[QCFlag]:
    flags = [QCFlag(level=r.level.value, code=r.code, message=r.message) for r in study.qc.reasons]
    if predictor.score_method is not None and "none stored" in str(predictor.operating_point.get("method")):
        flags.append(
            QCFlag(
                level="warn",
                code="no_operating_point",
                message=f"the checkpoint stores no operating point; threshold {predictor.threshold} is a default",
            )
        )
    expected = predictor.data_cfg.modality
    if expected and study.modality not in ("OT", expected):
        flags.append(
            QCFlag(
                level="warn",
                code="modality_mismatch",
                message=f"the model was trained on {expected}, this study is {study.modality}",
            )
        )
    return flags


def _build_report(
    task: StudyTask,
    study: Study,
    pred: Prediction,
    predictor: Predictor,
    labels: np.ndarray | None,
    saliency: dict[str, np.ndarray],
    source: str,
    options: InferOptions,
) -> StudyReport:
    lesions: list[Lesion] = []
    structures: list[Structure] = []
    if labels is not None:
        n_seg = int(pred.seg_probs.shape[0]) if pred.seg_probs is not None else 2
        names = predictor.mask_label_names or {i: f"class {i}" for i in range(n_seg)}
        for seg in measure_lesions(labels, study.spacing, names):
            if predictor.mask_kinds.get(seg.label, "lesion") == "anatomy":
                structures.append(Structure(**seg.model_dump()))
            else:
                lesions.append(seg)
    flags = _qc_flags(study, predictor)
    verdict = max((f.level for f in flags), key=("ok", "warn", "reject").index, default="ok")
    class_probs = None
    if pred.class_probs is not None:
        class_probs = {
            predictor.label_names.get(i, f"class {i}"): round(float(p), 6) for i, p in enumerate(pred.class_probs)
        }
    probability = decision = operating_point = None
    if pred.probability is not None:  # a model of anatomy only gives no score and no verdict
        probability = round(min(max(pred.probability, 0.0), 1.0), 6)
        decision = "abnormal" if pred.probability >= predictor.threshold else "normal"
        op = {k: v for k, v in jsonable(predictor.operating_point).items() if k in OperatingPoint.model_fields}
        operating_point = OperatingPoint(**op)
    return StudyReport(
        study_key=task.key,
        probability=probability,
        score_method=predictor.score_method if probability is not None else None,
        decision=decision,
        operating_point=operating_point,
        class_probabilities=class_probs,
        lesions=lesions,
        structures=structures,
        qc=flags,
        qc_verdict=verdict,
        model=ModelInfo(
            name=predictor.model_name,
            weights_sha256=predictor.weights_sha256,
            checkpoint=predictor.path.name,
            task=predictor.task,
            medhybrid_version=__version__,
            temperature=predictor.temperature,
        ),
        source=Source(
            format=study.source_format,
            path=source,
            modality=study.modality,
            shape=list(study.shape),
            spacing_mm=[round(s, 6) for s in study.spacing],
            series_uid=study.series_uid,
            description=str(study.metadata.get("SeriesDescription"))
            if study.metadata.get("SeriesDescription")
            else None,
            manifest_id=task.manifest_id,
        ),
        outputs=Outputs(
            mask="mask.nii.gz" if labels is not None else None,
            saliency=[
                Saliency(method=m, file=f"saliency_{m}.nii.gz", description=SALIENCY_DESCRIPTIONS[m]) for m in saliency
            ],
            dicom_seg="seg.dcm" if labels is not None and task.series is not None and options.dicom_outputs else None,
            dicom_sr="sr.dcm" if task.series is not None and options.dicom_outputs else None,
        ),
        timings_s={},
        tta=predictor.tta,
        patient=_patient(task) if options.include_phi else None,
    )


def _patient(task: StudyTask) -> dict[str, str] | None:
    """PatientName/ID/BirthDate of a DICOM study (only called with --include-phi)."""
    if task.series is None:
        return None
    import pydicom

    ds = pydicom.dcmread(
        task.series.headers[0].path,
        stop_before_pixels=True,
        specific_tags=list(PATIENT_KEYS),
    )
    return {k: str(ds.get(k, "")) for k in PATIENT_KEYS}


def _write_outputs(
    folder: Path,
    task: StudyTask,
    study: Study,
    report: StudyReport,
    predictor: Predictor,
    labels: np.ndarray | None,
    saliency: dict[str, np.ndarray],
    options: InferOptions,
) -> None:
    if labels is not None:
        atomic_write_bytes(
            folder / "mask.nii.gz", nifti_bytes(labels, study.affine, description="medhybrid mask", compresslevel=1)
        )
    for method, values in saliency.items():
        atomic_write_bytes(
            folder / f"saliency_{method}.nii.gz",
            nifti_bytes(values, study.affine, description=f"medhybrid {method}", compresslevel=1, slope=1.0 / 255.0),
        )
    if task.series is not None and options.dicom_outputs:
        _write_dicom(folder, task.series, report, predictor, labels, options)
    frame = DisplayFrame(study.affine, study.spacing, two_d=study.is_2d, reorient=study.source_format != "medmnist")
    window = window_for(study.modality, predictor.data_cfg.intensity, study.array)
    kinds = set(predictor.mask_kinds.values())
    mask_title = "Anatomy mask" if kinds == {"anatomy"} else "Lesion mask" if kinds == {"lesion"} else "Mask"
    slices, thumb = render_panels(study.array, labels, saliency, frame, window, mask_title)
    atomic_write_bytes(folder / "thumb.png", thumb)
    atomic_write_bytes(folder / "report.html", report_html(report.model_dump(mode="json"), slices, predictor.card))


def _write_dicom(
    folder: Path,
    series: DicomSeries,
    report: StudyReport,
    predictor: Predictor,
    labels: np.ndarray | None,
    options: InferOptions,
) -> None:
    from medhybrid.infer.dicom_out import AlgorithmInfo, Findings, SegmentFinding, source_datasets, write_seg, write_sr

    algorithm = AlgorithmInfo(
        name=f"medhybrid {predictor.model_name}",
        version=f"{__version__}+{predictor.weights_sha256[:8]}",
        weights_sha256=predictor.weights_sha256,
    )
    sources = source_datasets(series.headers)
    seg = None
    if labels is not None:
        names = {k: v for k, v in predictor.mask_label_names.items() if k != 0} or {1: "lesion"}
        seg = write_seg(
            labels,
            series.headers,
            names,
            algorithm,
            folder / "seg.dcm",
            include_phi=options.include_phi,
            sources=sources,
            segment_kinds=predictor.mask_kinds,
        )
    measured = [(les, "lesion") for les in report.lesions] + [(st, "anatomy") for st in report.structures]
    findings = Findings(
        is_probability=report.score_method in (None, "classifier"),
        probability=report.probability,
        decision=report.decision,
        threshold=report.operating_point.threshold if report.operating_point is not None else None,
        segments=tuple(
            SegmentFinding(label=m.label, name=m.name, volume_ml=m.volume_ml, components=m.components, kind=kind)
            for m, kind in sorted(measured, key=lambda x: x[0].label)
        ),
    )
    write_sr(
        findings, series.headers, seg, algorithm, folder / "sr.dcm", include_phi=options.include_phi, sources=sources
    )


# --- summary ---------------------------------------------------------------------------------------
def _row(report: StudyReport) -> dict[str, Any]:
    return {
        "study_key": report.study_key,
        "status": "ok",
        "probability": "" if report.probability is None else report.probability,
        "decision": report.decision or "",
        "threshold": report.operating_point.threshold if report.operating_point is not None else "",
        "lesion_ml": round(sum(les.volume_ml for les in report.lesions), 3) if report.lesions else "",
        "lesion_components": sum(les.components for les in report.lesions) if report.lesions else "",
        "qc_verdict": report.qc_verdict,
        "source": report.source.path,
        "manifest_id": report.source.manifest_id or "",
        "report": f"{report.study_key}/report.html",
        "thumbnail": True,
        "error": "",
        "reason": "",
    }


def run_key(predictor: Predictor, options: InferOptions) -> str:
    """Digest of everything that decides a study's report: the weights, how scores become decisions
    (temperature, operating point, mask kinds, minimum lesion size), TTA, the saliency methods, the
    outputs asked for and the medhybrid version. A finished study is skipped on a rerun only when its
    report carries the same key."""
    settings = {
        "weights": predictor.weights_sha256,
        "temperature": predictor.temperature,
        "operating_point": jsonable(predictor.operating_point),
        "mask_kinds": predictor.mask_kinds,
        "min_lesion_ml": predictor.eval_cfg.min_lesion_ml,
        "tta": predictor.tta,
        "saliency": list(predictor.saliency_methods),
        "include_phi": options.include_phi,
        "dicom_outputs": options.dicom_outputs,
        "version": __version__,
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _row_from_report(path: Path, key: str) -> dict[str, Any] | None:
    """The summary row of a study finished with the same :func:`run_key`, else None (the study is redone:
    its report is unreadable, old, or was made by another model or decision settings)."""
    try:
        report = StudyReport.model_validate(json.loads(path.read_text(encoding="utf-8")))
    except Exception:  # an old or damaged report: infer the study again
        return None
    return _row(report) if report.run_key == key else None


def _rank_key(row: dict[str, Any]) -> tuple[float, str]:
    """Worklist order: highest score first; studies without a score (no verdict) after, by key."""
    score = row.get("probability")
    return (-float(score) if score not in ("", None) else float("inf"), str(row["study_key"]))


def _write_summary(
    out: Path, rows: list[dict[str, Any]], failed: list[dict[str, Any]], predictor: Predictor, input_path: Path
) -> None:
    ranked = sorted(rows, key=_rank_key)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=SUMMARY_FIELDS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for n, row in enumerate(ranked, 1):
        writer.writerow({**row, "rank": n})
    for row in failed:
        writer.writerow({**row, "rank": ""})
    atomic_write_bytes(out / "summary.csv", buf.getvalue().encode("utf-8"))
    threshold = predictor.threshold if predictor.score_method is not None else None  # anatomy: no verdict
    meta = {"model": predictor.model_name, "threshold": threshold, "input": str(input_path)}
    atomic_write_bytes(out / "index.html", index_html(ranked, failed, meta))
