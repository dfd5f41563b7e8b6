"""The run's worklist: one row per study (``summary.csv``, ``index.html``) ranked by the study's score,
and the run key that decides whether a finished study can be kept on a rerun."""

from __future__ import annotations

import csv
import hashlib
import io
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medhybrid import __version__
from medhybrid.infer.render import index_html
from medhybrid.infer.report import StudyReport, jsonable
from medhybrid.io.writers import atomic_write_bytes, sha256_file

if TYPE_CHECKING:
    from medhybrid.infer.predictor import Predictor
    from medhybrid.infer.tasks import InferOptions

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


def summary_row(report: StudyReport) -> dict[str, Any]:
    return {
        "study_key": report.study_key,
        "status": "not_assessed" if report.decision == "not_assessed" else "ok",
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
        "error": "output_failed" if report.output_errors else "",
        "reason": "; ".join(
            [f"not assessed: {r.message}" for r in report.assessment.reasons if not report.assessment.assessed]
            + [f"{e.output} not written: {e.reason}" for e in report.output_errors]
        ),
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
        "force": options.force,
        "scope": predictor.scope.as_dict(),
        "version": __version__,
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:32]


def row_from_report(path: Path, key: str) -> dict[str, Any] | None:
    """The summary row of a study finished with the same :func:`run_key`, else None (the study is redone:
    its report is unreadable, old, or was made by another model or decision settings)."""
    try:
        report = StudyReport.model_validate(json.loads(path.read_text(encoding="utf-8")))
    except Exception:  # an old or damaged report: infer the study again
        return None
    if report.run_key != key or not _complete(path.parent, report):
        return None
    return summary_row(report)


def _complete(folder: Path, report: StudyReport) -> bool:
    """Every file the report lists is there with the bytes it was written with (a folder another process
    damaged, or a file deleted or edited since, is redone)."""
    listed = report.outputs.files()
    if set(listed) != set(report.outputs.sha256):
        return False
    for name in listed:
        try:
            if sha256_file(folder / name) != report.outputs.sha256[name]:
                return False
        except OSError:
            return False
    return True


def _rank_key(row: dict[str, Any]) -> tuple[float, str]:
    """Worklist order: highest score first; studies without a score (no verdict) after, by key."""
    score = row.get("probability")
    return (-float(score) if score not in ("", None) else float("inf"), str(row["study_key"]))


def write_summary(
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
