"""One study's outputs: its prediction mapped back onto the scan, measured, and written as report.json,
report.html, thumbnail, mask and saliency NIfTI, and DICOM SEG/SR, into a partial folder that becomes
the study's folder only when complete."""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medhybrid import __version__
from medhybrid.errors import InferenceError, MedHybridError
from medhybrid.infer.predictor import Prediction, Predictor
from medhybrid.infer.render import DisplayFrame, render_panels, report_html, window_for
from medhybrid.infer.report import (
    Assessment,
    Lesion,
    ModelInfo,
    OperatingPoint,
    OutputError,
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
from medhybrid.infer.scope import Reason, after_model
from medhybrid.infer.tasks import InferOptions, StudyTask
from medhybrid.io.dicom import DicomSeries
from medhybrid.io.study import Study
from medhybrid.io.writers import atomic_write_bytes, mark_output_folder, nifti_bytes, sha256_file

logger = logging.getLogger(__name__)

REPORT_FILE = "report.json"
PATIENT_KEYS = ("PatientName", "PatientID", "PatientBirthDate")  # read only with --include-phi
PARTIAL_PREFIX = ".partial-"
OLD_PREFIX = ".old-"
SALIENCY_DESCRIPTIONS = {
    "gradcam": "Grad-CAM on the encoder's last stage; uint8 with scl_slope 1/255, so readers see [0, 1]",
    "attention": "attention rollout of the Transformer; uint8 with scl_slope 1/255, so readers see [0, 1]",
}


def finish_study(
    task: StudyTask,
    study: Study,
    pred: Prediction | None,
    timing: tuple[float, str],
    predictor: Predictor,
    out: Path,
    options: InferOptions,
    key: str,
    reasons: Sequence[Reason] = (),
) -> tuple[StudyReport, dict[str, float]]:
    """Map the prediction back to the scan, measure, write every file, move the study folder into place.

    Args:
        pred: the model's prediction, or None when the study was not run (outside the model's scope).
        timing: the seconds loading took, and the study's source as the report shows it.
        key: the run key (:func:`medhybrid.infer.worklist.run_key`) the report records.
        reasons: why the study is outside the model's scope, found before the model ran
            (:func:`medhybrid.infer.scope.before_model`); with them and without ``options.force`` the
            study is NOT ASSESSED.
    """
    t1 = time.perf_counter()
    reasons = list(reasons)
    labels: np.ndarray | None = None
    saliency: dict[str, np.ndarray] = {}
    if pred is not None:
        maps: list[tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor], type]] = [
            (v, to_uint8, np.uint8) for v in pred.saliency.values()
        ]
        if pred.seg_probs is not None:
            maps.append((pred.seg_probs, argmax_labels, np.uint8))
        coverage: list[float] = []
        native = to_native_many(maps, pred.affine, pred.native_affine, study.spatial_shape, coverage=coverage)
        saliency = dict(zip(pred.saliency, native, strict=False))
        labels = native[-1] if pred.seg_probs is not None else None
        reasons += after_model(coverage[0] if coverage else None)
    assessed = not reasons or options.force
    assessment = Assessment(assessed=assessed, forced=bool(reasons) and options.force, reasons=reasons)
    if not assessed:  # no claim about a study the model did not properly see: no score, mask or map
        pred, labels, saliency = None, None, {}
    t_resample = time.perf_counter() - t1
    t_load, source = timing
    with _partial_folder(out / task.key) as partial:
        t2 = time.perf_counter()
        report = _build_report(task, study, pred, predictor, labels, saliency, source, options, assessment)
        if report.decision == "normal" and labels is not None:
            # a study called normal lists no lesion (the report never says NORMAL beside a lesion volume): the
            # mask keeps anatomy labels only
            for label, kind in predictor.mask_kinds.items():
                if kind == "lesion":
                    labels[labels == label] = 0
            report.lesions = []
        report.run_key = key
        if assessment.forced:
            _warn(
                report,
                "assessed_out_of_scope",
                "assessed with --force although outside the model's scope: "
                + "; ".join(r.message for r in assessment.reasons),
            )
        slices, viewer = _write_outputs(partial, task, study, report, predictor, labels, saliency, options)
        timings = {
            "load": t_load,
            "preprocess": pred.timings["preprocess"] if pred is not None else 0.0,
            "model": pred.timings["model"] if pred is not None else 0.0,
            "resample": t_resample,
            "write": time.perf_counter() - t2,
        }
        timings["total"] = sum(timings.values())
        report.timings_s = {k: round(v, 4) for k, v in timings.items()}
        page = report_html(report.model_dump(mode="json"), slices, predictor.card, viewer=viewer)
        atomic_write_bytes(partial / "report.html", page)
        report.outputs.sha256 = {name: sha256_file(partial / name) for name in report.outputs.files()}
        mark_output_folder(partial)
        atomic_write_bytes(partial / REPORT_FILE, report.to_json())  # last: its presence means it is complete
    return report, timings


@contextlib.contextmanager
def _partial_folder(final: Path) -> Iterator[Path]:
    """A fresh ``.partial-<name>`` folder beside ``final``, moved into place when the block ends normally and
    removed when it raises: a failed study leaves nothing behind (e.g. on a full disk)."""
    partial = final.with_name(f"{PARTIAL_PREFIX}{final.name}")
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir()
    try:
        yield partial
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    _commit(partial, final)


def _warn(report: StudyReport, code: str, message: str) -> None:
    """Add a QC warning, raising the report's QC verdict to warn (a reject stays a reject)."""
    report.qc.append(QCFlag(level="warn", code=code, message=message))
    report.qc_verdict = "warn" if report.qc_verdict == "ok" else report.qc_verdict


def check_dims(study: Study, predictor: Predictor, task: StudyTask) -> None:
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
    expected = predictor.scope.modalities
    if expected and study.modality in ("", "OT"):  # another modality is NOT ASSESSED (infer/scope.py)
        flags.append(
            QCFlag(
                level="warn",
                code="modality_unknown",
                message=f"the study's modality is unknown; the model was trained on {', '.join(expected)}",
            )
        )
    return flags


def _build_report(
    task: StudyTask,
    study: Study,
    pred: Prediction | None,
    predictor: Predictor,
    labels: np.ndarray | None,
    saliency: dict[str, np.ndarray],
    source: str,
    options: InferOptions,
    assessment: Assessment,
) -> StudyReport:
    lesions: list[Lesion] = []
    structures: list[Structure] = []
    if labels is not None:
        n_seg = int(pred.seg_probs.shape[0]) if pred is not None and pred.seg_probs is not None else 2
        names = predictor.mask_label_names or {i: f"class {i}" for i in range(n_seg)}
        for seg in measure_lesions(labels, study.spacing, names):
            if predictor.mask_kinds.get(seg.label, "lesion") == "anatomy":
                structures.append(Structure(**seg.model_dump()))
            else:
                lesions.append(seg)
    flags = _qc_flags(study, predictor)
    verdict = max((f.level for f in flags), key=("ok", "warn", "reject").index, default="ok")
    class_probs = None
    if pred is not None and pred.class_probs is not None:
        class_probs = {
            predictor.label_names.get(i, f"class {i}"): round(float(p), 6) for i, p in enumerate(pred.class_probs)
        }
    probability = decision = operating_point = None
    if not assessment.assessed:
        decision = "not_assessed"
    elif pred is not None and pred.probability is not None:  # a model of anatomy only gives no score/verdict
        probability = round(min(max(pred.probability, 0.0), 1.0), 6)
        decision = "abnormal" if pred.probability >= predictor.threshold else "normal"
        op = {k: v for k, v in jsonable(predictor.operating_point).items() if k in OperatingPoint.model_fields}
        operating_point = OperatingPoint(**op)
    return StudyReport(
        study_key=task.key,
        probability=probability,
        score_method=predictor.score_method if probability is not None else None,
        decision=decision,
        assessment=assessment,
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
) -> tuple[list[dict[str, Any]], str]:
    """Every file but report.html and report.json; returns the page's key slices and viewer section (the page
    is written once the timings are known)."""
    # The NIfTI files are gzipped on a thread of their own while the DICOM objects and the viewer are made
    # here: zlib releases the GIL, and on a 512x512x300 CT the three files take seconds (docs/benchmarks.md).
    # The thread's error, if any, is raised below as it was before (the study's outputs are not complete).
    niftis = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="medhybrid-nifti")
    nifti_done = niftis.submit(_write_niftis, folder, study, labels, saliency)
    niftis.shutdown(wait=False)
    try:
        if task.series is not None and options.dicom_outputs:
            _write_dicom(folder, task.series, report, predictor, labels, options)
        if report.output_errors:
            _warn(
                report,
                "output_failed",
                "not written: "
                + "; ".join(f"{e.output} ({e.reason})" for e in report.output_errors)
                + ". The other outputs are complete",
            )
        frame = DisplayFrame(study.affine, study.spacing, two_d=study.is_2d, reorient=study.source_format != "medmnist")
        window = window_for(study.modality, predictor.data_cfg.intensity, study.array)
        kinds = set(predictor.mask_kinds.values())
        mask_title = "Anatomy mask" if kinds == {"anatomy"} else "Lesion mask" if kinds == {"lesion"} else "Mask"
        slices, thumb = render_panels(study.array, labels, saliency, frame, window, mask_title)
        atomic_write_bytes(folder / "thumb.png", thumb)
        from medhybrid.infer.viewer import viewer_html  # here: the viewer is only this function's concern

        viewer = viewer_html(
            study,
            labels,
            saliency,
            frame,
            window,
            mask_names=predictor.mask_label_names,
            finding_labels={les.label: les.name for les in report.lesions},
            mask_title=mask_title,
            instance_numbers=[h.instance_number for h in task.series.headers] if task.series is not None else None,
        )
    finally:
        concurrent.futures.wait([nifti_done])  # nothing is written into the folder after this returns
    nifti_done.result()
    return slices, viewer


def _write_niftis(folder: Path, study: Study, labels: np.ndarray | None, saliency: dict[str, np.ndarray]) -> None:
    """mask.nii.gz and one saliency_<method>.nii.gz per map, on the scan's grid (gzip level 1: fast)."""
    if labels is not None:
        atomic_write_bytes(
            folder / "mask.nii.gz", nifti_bytes(labels, study.affine, description="medhybrid mask", compresslevel=1)
        )
    for method, values in saliency.items():
        atomic_write_bytes(
            folder / f"saliency_{method}.nii.gz",
            nifti_bytes(values, study.affine, description=f"medhybrid {method}", compresslevel=1, slope=1.0 / 255.0),
        )


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
    try:
        sources = source_datasets(series.headers)
    except Exception as exc:  # noqa: BLE001 - neither object can be made; the rest of the study is kept
        _output_failed(report, folder, ("dicom_seg", "dicom_sr"), exc)
        return
    seg = None
    if labels is not None:
        names = {k: v for k, v in predictor.mask_label_names.items() if k != 0} or {1: "lesion"}
        try:
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
        except Exception as exc:  # noqa: BLE001 - the SR (without a SEG reference) and the rest are still written
            _output_failed(report, folder, ("dicom_seg",), exc)
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
    try:
        write_sr(
            findings,
            series.headers,
            seg,
            algorithm,
            folder / "sr.dcm",
            include_phi=options.include_phi,
            sources=sources,
        )
    except Exception as exc:  # noqa: BLE001 - one failed output never loses the study's others
        _output_failed(report, folder, ("dicom_sr",), exc)


OUTPUT_FILES = {"dicom_seg": "seg.dcm", "dicom_sr": "sr.dcm"}


def _output_failed(report: StudyReport, folder: Path, outputs: tuple[str, ...], exc: Exception) -> None:
    """Record that ``outputs`` could not be written (report, worklist, log) and leave no file of theirs."""
    code = exc.code if isinstance(exc, MedHybridError) else type(exc).__name__
    reason = exc.message if isinstance(exc, MedHybridError) else str(exc)[:300]
    for output in outputs:
        (folder / OUTPUT_FILES[output]).unlink(missing_ok=True)
        setattr(report.outputs, output, None)
        report.output_errors.append(OutputError(output=output, code=code, reason=reason))
    logger.warning("study %s: %s not written: %s", report.study_key, ", ".join(outputs), reason)
