"""``medhybrid infer``: a folder of studies (or one study, or a manifest) to one report folder per study.

Layout of ``OUT``::

    index.html, summary.csv, infer.log
    <study_key>/report.json, report.html, thumb.png, mask.nii.gz,
                saliency_gradcam.nii.gz, saliency_attention.nii.gz, seg.dcm, sr.dcm (DICOM input)

Modules: :mod:`medhybrid.infer.tasks` finds the studies, this one runs them through a loader -> model ->
writer pipeline, :mod:`medhybrid.infer.study_outputs` writes one study's files, and
:mod:`medhybrid.infer.worklist` keeps the ranked worklist.

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
import errno
import logging
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

from medhybrid.errors import InferenceError, InputError, MedHybridError
from medhybrid.infer.lock import output_lock
from medhybrid.infer.predictor import Prediction, Predictor, Prepared
from medhybrid.infer.scope import Reason, before_model
from medhybrid.infer.study_outputs import OLD_PREFIX, PARTIAL_PREFIX, REPORT_FILE, check_dims, finish_study
from medhybrid.infer.tasks import InferOptions, StudyTask, find_studies, follow_dicomdir, raise_no_studies
from medhybrid.infer.worklist import row_from_report, run_key, summary_row, write_summary
from medhybrid.io.dicom import load_series
from medhybrid.io.dicom_files import FileProblem, third_party_failure
from medhybrid.io.readers import read_geometry, read_image
from medhybrid.io.study import Study, study_key
from medhybrid.io.writers import mark_output_folder

logger = logging.getLogger(__name__)

__all__ = ["InferOptions", "InferResult", "find_studies", "run_inference"]


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
    input_path = follow_dicomdir(Path(input_path))
    with output_lock(out):
        return _run_locked(input_path, out, predictor, options, on_study)


def _run_locked(
    input_path: Path,
    out: Path,
    predictor: Predictor,
    options: InferOptions,
    on_study: Callable[[dict[str, Any]], None] | None,
) -> InferResult:
    # the output folder is marked before the input is walked, so an --out inside the input is never read
    mark_output_folder(out)
    tasks, rejected = find_studies(input_path, options, predictor.scope.modalities)
    if not tasks:
        raise_no_studies(input_path, rejected)
    _clean_partials(out)
    t_start = time.perf_counter()
    book = _Book(out, predictor, input_path, on_study, run_key(predictor, options))
    with _file_log(out / "infer.log"):
        logger.info(
            "infer: %d studies under %s with %s (threshold %.3f, %s)",
            len(tasks),
            input_path,
            predictor.model_name,
            predictor.threshold,
            predictor.operating_point.get("method"),
        )
        for problem in rejected:  # a file that claimed to be a DICOM image and failed is named in the worklist
            logger.info("rejected file %s: %s", problem.path, problem.reason)
            book.fail(_rejected_row(problem, input_path))
        todo = _plan(tasks, out, options, book)
        pipeline = _Pipeline(predictor, out, options, book, input_path)
        pipeline.run(todo)
        try:
            book.write_summary()
        except OSError as exc:
            raise _disk_error(out, exc, len(book.rows)) from None
        if pipeline.disk_full is not None:
            raise _disk_error(out, pipeline.disk_full, len(book.rows))
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
        write_summary(self.out, self.rows, self.failed, self.predictor, self.input_path)


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
            row = row_from_report(final / REPORT_FILE, book.run_key)
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
    out_of_scope: list[Reason] = field(default_factory=list)  # why the study is NOT ASSESSED (infer/scope.py)
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
        self.disk_full: OSError | None = None  # set by the writer: the run stops, finished studies are kept
        self.loaded_count = 0

    def run(self, tasks: list[StudyTask]) -> None:
        loader = threading.Thread(target=self._load_all, args=(tasks,), name="medhybrid-load", daemon=True)
        writer = threading.Thread(target=self._write_all, name="medhybrid-write", daemon=True)
        loader.start()
        writer.start()
        try:
            while (item := self.loaded.get()) is not None:
                if item.failure is None and item.prepared is not None:
                    try:
                        item.pred = self.predictor.run(item.prepared)
                    except BaseException as exc:  # recorded per study, the batch goes on
                        if not third_party_failure(exc):
                            raise
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
        if self.loaded_count < len(tasks) and self.disk_full is None:
            raise InferenceError(  # never end a batch as if it were finished when studies were not run
                f"the loader stopped after {self.loaded_count} of {len(tasks)} studies (see infer.log)",
                path=self.out,
                fix="rerun: finished studies are kept and skipped",
            )

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
                    item.out_of_scope = before_model(item.study, self.predictor.scope)
                    if task.out_of_scope:  # no series of the model's modality: says what the study holds
                        item.out_of_scope = [Reason(code="modality", message=task.out_of_scope)] + [
                            r for r in item.out_of_scope if r.code != "modality"
                        ]
                    if not item.out_of_scope or self.options.force:  # else NOT ASSESSED: the model never runs
                        check_dims(item.study, self.predictor, task)
                        item.prepared = self.predictor.preprocess(item.study)
                except BaseException as exc:  # recorded per study (a decoder panic too), the batch goes on
                    if not third_party_failure(exc):
                        raise
                    item.failure = _describe(exc, item)
                    item.study = None
                self.loaded.put(item)
                self.loaded_count += 1
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
                        assert item.study is not None
                        timing = (item.t_load, item.source)
                        report, timings = finish_study(
                            item.task, item.study, item.pred, timing, self.predictor, self.out, self.options,
                            self.book.run_key, item.out_of_scope,
                        )  # fmt: skip
                    except BaseException as exc:  # recorded per study, the batch goes on
                        if not third_party_failure(exc):
                            raise
                        item.failure = _describe(exc, item)
                        if isinstance(exc, OSError) and exc.errno in DISK_FULL:
                            self.disk_full = exc
                            self.stop.set()  # every further study would fail the same way
                    else:
                        logger.info(
                            "study %s: score %s %s (%.2f s)%s",
                            item.task.key,
                            "n/a" if report.probability is None else f"{report.probability:.3f}",
                            report.decision or "(no verdict)",
                            timings["total"],
                            "".join(f"; {r.message}" for r in report.assessment.reasons),
                        )
                        self.book.done(summary_row(report), timings)
                if item.failure is not None:
                    self.book.fail(_failure(item.task, item.source, *item.failure))
                try:
                    self.book.write_summary()
                except OSError as exc:  # e.g. disk full: the study folders are what matter; retried next study
                    logger.error("cannot write summary.csv/index.html: %s", exc)
            finally:
                item.study = item.pred = None
                self._release(item.voxels)


DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def _disk_error(out: Path, exc: OSError, n_done: int) -> InferenceError:
    return InferenceError(
        f"cannot write to the output folder ({exc.strerror or exc}); {n_done} studies were finished and are complete",
        path=out,
        fix="free disk space and rerun: finished studies are kept and skipped",
    )


def _describe(exc: BaseException, item: _Item) -> tuple[str, str]:
    """A failure's (code, reason), logged; unexpected exception types keep their traceback in the log."""
    if isinstance(exc, MedHybridError):
        logger.warning("study %s failed: %s", item.task.key, exc)
        return exc.code, str(exc)
    if isinstance(exc, OSError) and exc.errno in DISK_FULL:  # not a bug: no traceback
        logger.error("study %s not written: %s", item.task.key, exc.strerror)
        return "disk_full", str(exc.strerror)
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


def _rejected_row(problem: FileProblem, input_path: Path) -> dict[str, Any]:
    task = StudyTask(key=study_key(str(problem.path.resolve())), source=problem.path, kind="dicom")
    return _failure(task, _relative(problem.path, input_path), problem.code, f"{problem.path.name}: {problem.reason}")


def _relative(path: Path, root: Path) -> str:
    try:
        base = root if root.is_dir() else root.parent
        relative = str(Path(path).resolve().relative_to(base.resolve()))
        return relative if relative not in ("", ".") else Path(path).resolve().name  # the input is the study
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


# --- summary ---------------------------------------------------------------------------------------
