"""NOT ASSESSED: a study outside the model's scope never gets a NORMAL (or any) verdict, says why in the
report, its HTML, the worklist and the SR, and ``--force`` assesses it anyway, saying so."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.sr.codedict import codes

from medhybrid.infer.batch import InferOptions, run_inference
from medhybrid.infer.report import StudyReport
from medhybrid.infer.scope import Scope, after_model, before_model, scope_from_checkpoint
from medhybrid.io.study import Study
from medhybrid.train.checkpoint import load_checkpoint

REPO = Path(__file__).resolve().parents[1]


def one_study(cohort: Path, dest: Path, index: int = 0, **tags: Any) -> Path:
    folder = dest / f"s{index}"
    shutil.copytree(cohort / "dicom" / f"synth_{index:04d}", folder)
    for f in sorted(folder.iterdir()):
        ds = pydicom.dcmread(f)
        for keyword, value in tags.items():
            setattr(ds, keyword, value)
        ds.save_as(f)
    return folder


def report_of(out: Path) -> tuple[Path, StudyReport]:
    (folder,) = [p for p in out.iterdir() if p.is_dir() and not p.name.startswith(".")]
    return folder, StudyReport.model_validate_json((folder / "report.json").read_text())


def test_the_checkpoint_declares_its_scope(tiny_run: Path) -> None:
    scope = scope_from_checkpoint(load_checkpoint(tiny_run / "best.pt"))
    assert scope.modalities == ("CT",) and scope.spatial_dims == 3
    assert scope.spacing_min == scope.spacing_max == pytest.approx((0.75, 0.75, 2.5))  # the synthetic phantoms
    assert scope.n_train is not None and scope.n_train > 0


@pytest.mark.parametrize(
    "tags,code",
    [
        ({"Modality": "MR"}, "modality"),
        ({"Modality": "US"}, "modality"),
        ({"ImageType": ["ORIGINAL", "PRIMARY", "LOCALIZER"]}, "localizer"),
        ({"PixelSpacing": [3.0, 3.0]}, "spacing"),
    ],
    ids=["mr", "us", "scout", "spacing"],
)
def test_a_study_outside_the_scope_is_not_assessed(
    infer_cohort: Path, tiny_run: Path, tmp_path: Path, tags: dict[str, Any], code: str
) -> None:
    folder = one_study(infer_cohort, tmp_path / "in", **tags)
    result = run_inference(folder, tiny_run, tmp_path / "out")
    (row,) = result.done
    assert row["status"] == "not_assessed" and row["probability"] == "" and "not assessed" in row["reason"]
    study_dir, report = report_of(tmp_path / "out")
    assert report.decision == "not_assessed" and report.probability is None and not report.lesions
    assert not report.assessment.assessed and [r.code for r in report.assessment.reasons] == [code]
    assert report.outputs.mask is None and not report.outputs.saliency and report.outputs.dicom_seg is None
    html = (study_dir / "report.html").read_text()
    assert "NOT ASSESSED" in html and "NORMAL" not in html.replace("NOT ASSESSED", "")
    sr = pydicom.dcmread(study_dir / "sr.dcm")
    values = [
        item.ConceptCodeSequence[0].CodeValue
        for item in _walk(sr.ContentSequence)
        if getattr(item, "ValueType", "") == "CODE"
    ]
    assert codes.SCT.NotEvaluated.value in values
    assert codes.SCT.Normal.value not in values and codes.SCT.Abnormal.value not in values
    summary = list(csv.DictReader((tmp_path / "out" / "summary.csv").open()))
    assert summary[0]["status"] == "not_assessed" and summary[0]["decision"] == "not_assessed"


def test_a_study_of_several_series_none_of_the_models_modality_is_not_assessed(
    infer_cohort: Path, tiny_run: Path, tmp_path: Path
) -> None:
    """Two MR series in one study for a CT model: not an ambiguous-series failure but NOT ASSESSED, saying
    what the study holds (the TCIA brain study of ../shared/data has five)."""
    first = one_study(infer_cohort, tmp_path / "in", 0, Modality="MR", SeriesInstanceUID="1.2.826.0.1.3680043.10.5.1")
    first.rename(tmp_path / "in" / "first")
    one_study(infer_cohort, tmp_path / "in", 0, Modality="MR")
    result = run_inference(tmp_path / "in", tiny_run, tmp_path / "out")
    assert [r["status"] for r in result.done] == ["not_assessed"] and not result.failed
    _, report = report_of(tmp_path / "out")
    (reason,) = report.assessment.reasons[:1]
    assert reason.code == "modality" and "no CT series (2 MR)" in reason.message


def _walk(items: Any) -> Any:
    for item in items:
        yield item
        if "ContentSequence" in item:
            yield from _walk(item.ContentSequence)


def test_a_single_slice_for_a_3d_model_is_not_assessed(infer_cohort: Path, tiny_run: Path, tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(sorted((infer_cohort / "dicom" / "synth_0000").iterdir())[10], folder / "IM0011.dcm")
    result = run_inference(folder, tiny_run, tmp_path / "out")
    assert [r["status"] for r in result.done] == ["not_assessed"]
    _, report = report_of(tmp_path / "out")
    assert [r.code for r in report.assessment.reasons] == ["dimensions"]


def test_force_assesses_and_says_so(infer_cohort: Path, tiny_run: Path, tmp_path: Path) -> None:
    folder = one_study(infer_cohort, tmp_path / "in", Modality="MR")
    infer = [sys.executable, "-m", "medhybrid", "infer", str(folder), "--model", str(tiny_run), "--out"]
    proc = subprocess.run([*infer, str(tmp_path / "o"), "--force"], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    _, report = report_of(tmp_path / "o")
    assert report.decision in ("normal", "abnormal") and report.probability is not None
    assert report.assessment.assessed and report.assessment.forced
    assert "assessed_out_of_scope" in {f.code for f in report.qc} and report.qc_verdict == "warn"
    # without --force the same study is NOT ASSESSED, and the CLI's last lines say so
    proc = subprocess.run([*infer, str(tmp_path / "n")], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0 and "1 NOT ASSESSED" in proc.stdout and "NOT ASSESSED (not assessed" in proc.stderr


def test_a_study_in_scope_is_assessed_and_a_normal_one_lists_no_lesion(
    infer_cohort: Path, tiny_run: Path, tmp_path: Path
) -> None:
    result = run_inference(infer_cohort / "dicom", tiny_run, tmp_path / "out", InferOptions(dicom_outputs=False))
    assert {r["status"] for r in result.done} == {"ok"}
    for folder in (tmp_path / "out").iterdir():
        if folder.is_dir() and not folder.name.startswith("."):
            report = json.loads((folder / "report.json").read_text())
            assert report["assessment"] == {"assessed": True, "forced": False, "reasons": []}
            if report["decision"] == "normal":
                assert report["lesions"] == []


def test_rules_in_isolation() -> None:
    ct = Study("s", np.zeros((8, 8, 8), np.float32), np.diag([0.75, 0.75, 2.5, 1.0]), "CT", Path("x"), "dicom")
    scope = Scope(modalities=("CT",), spatial_dims=3, spacing_min=(0.5, 0.5, 1.0), spacing_max=(1.0, 1.0, 3.0))
    assert before_model(ct, scope) == []
    unknown = Study("s", ct.array, ct.affine, "OT", Path("x.nii.gz"), "nifti")
    assert before_model(unknown, scope) == []  # unknown modality: assessed (with a QC warning)
    coarse = Study("s", ct.array, np.diag([0.75, 0.75, 7.0, 1.0]), "CT", Path("x"), "dicom")
    assert [r.code for r in before_model(coarse, scope)] == ["spacing"]  # 7 mm > 2 x 3 mm
    assert [r.code for r in before_model(coarse, Scope(modalities=("CT",)))] == []  # no range recorded
    assert [r.code for r in after_model(0.5)] == ["field_of_view"] and after_model(1.0) == []
    chest = Scope(modalities=("CT",), body_parts=("CHEST", "ABDOMEN"))
    head = Study("s", ct.array, ct.affine, "CT", Path("x"), "dicom", metadata={"BodyPartExamined": "head"})
    assert [r.code for r in before_model(head, chest)] == ["body_part"]
    assert before_model(head, Scope(modalities=("CT",))) == []  # no body part declared: not a rule
    assert before_model(ct, chest) == []  # a study naming no body part is not refused on it
    tagged = Study("s", ct.array, ct.affine, "CT", Path("x"), "dicom", metadata={"BodyPartExamined": "CHEST"})
    assert before_model(tagged, chest) == []


def test_a_sliver_of_a_scan_is_not_assessed() -> None:
    """A 16 x 16 x 5 CT at 0.49 mm (7.8 mm across: a downsized thumbnail) against phantoms of 48 mm or more;
    the same scan at full size (512 px, 250 mm) is assessed."""
    scope = Scope(modalities=("CT",), spatial_dims=3, extent_min=48.0)
    thumb = Study("s", np.zeros((16, 16, 5), np.float32), np.diag([0.49, 0.49, 2.5, 1.0]), "CT", Path("x"), "dicom")
    (reason,) = before_model(thumb, scope)
    assert reason.code == "field_of_view" and "7.84 mm" in reason.message and "48 mm" in reason.message
    whole = Study("s", np.zeros((512, 512, 10), np.float32), np.diag([0.49, 0.49, 2.5, 1.0]), "CT", Path("x"), "dicom")
    assert before_model(whole, scope) == []
    # exactly half the smallest training side is still assessed; below it is not
    half = Study("s", np.zeros((96, 96, 10), np.float32), np.diag([0.25, 0.25, 2.4, 1.0]), "CT", Path("x"), "dicom")
    assert before_model(half, scope) == []
    assert [r.code for r in before_model(half, Scope(modalities=("CT",), extent_min=48.2))] == ["field_of_view"]


def test_the_checkpoint_records_the_smallest_training_extent(tiny_run: Path) -> None:
    scope = scope_from_checkpoint(load_checkpoint(tiny_run / "best.pt"))
    assert scope.extent_min is not None and scope.extent_min > 0


def test_the_page_shows_timings_the_source_and_the_epochs_run(
    infer_cohort: Path, tiny_run: Path, tmp_path: Path
) -> None:
    """Defects seen: an empty "Timings:", the source shown as "DICOM CT · .", the best epoch as epochs trained."""
    folder = one_study(infer_cohort, tmp_path / "in")
    run_inference(folder, tiny_run, tmp_path / "out", InferOptions(dicom_outputs=False))
    study_dir, report = report_of(tmp_path / "out")
    html = (study_dir / "report.html").read_text()
    assert "Timings: load " in html and report.timings_s["total"] > 0
    assert report.source.path == folder.name
    run = json.loads((tiny_run / "run.json").read_text())
    assert f"{run['epochs_run']} epochs, best at epoch" in html
    # the model card states the scope the rules apply (the tiny run: CT phantoms at 0.75 x 0.75 x 2.5 mm)
    assert "Scope (what it may assess)</th><td>CT; 3D; native spacing 0.75-0.75 x 0.75-0.75 x 2.5-2.5 mm" in html
