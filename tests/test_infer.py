"""medhybrid infer end to end on the synthetic cohort (DICOM + NIfTI), and its building blocks."""

from __future__ import annotations

import csv
import gzip
import json
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
import yaml

from medhybrid.config import EvalConfig, MinSensitivity, load_pipeline
from medhybrid.data.synth import _fake_identity, synthesize_cohort
from medhybrid.infer.batch import InferOptions, run_inference
from medhybrid.infer.render import DisplayFrame, key_slices
from medhybrid.infer.report import StudyReport, measure_lesions, schema_markdown
from medhybrid.infer.resample import argmax_labels, to_native
from medhybrid.infer.saliency import rollout
from medhybrid.io.scan import load_study
from medhybrid.train import train
from medhybrid.train.evaluate import operating_point
from tests.conftest import INFER_STUDIES

REPO = Path(__file__).resolve().parents[1]
N_STUDIES = INFER_STUDIES
COMMON = {
    "report.json",
    "report.html",
    "thumb.png",
    "mask.nii.gz",
    "saliency_gradcam.nii.gz",
    "saliency_attention.nii.gz",
}
DICOM_ONLY = {"seg.dcm", "sr.dcm"}


# --- fixtures: a cohort and a (briefly) trained 3D multitask hybrid (tests/conftest.py) ---------------
@pytest.fixture(scope="module")
def cohort(infer_cohort: Path) -> Path:
    return infer_cohort


@pytest.fixture(scope="module")
def run_dir(tiny_run: Path) -> Path:
    return tiny_run


@pytest.fixture(scope="module")
def inferred(cohort: Path, run_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("infer") / "out"
    result = run_inference(cohort, run_dir, out)
    assert not result.failed, result.failed
    return out


def study_dirs(out: Path) -> list[Path]:
    return sorted(p for p in out.iterdir() if p.is_dir() and not p.name.startswith("."))


def run_cli(args: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "medhybrid", *args], capture_output=True, text=True, cwd=REPO, **kw)


# --- end to end -------------------------------------------------------------------------------------
def test_every_study_gets_a_complete_valid_report(inferred: Path, cohort: Path) -> None:
    dirs = study_dirs(inferred)
    assert len(dirs) == 2 * N_STUDIES  # each synthetic study exists as a DICOM series and a NIfTI file
    formats = []
    for d in dirs:
        report = StudyReport.model_validate(json.loads((d / "report.json").read_text()))
        formats.append(report.source.format)
        expected = COMMON | (DICOM_ONLY if report.source.format == "dicom" else set())
        assert expected <= {p.name for p in d.iterdir()}, d
        assert report.study_key == d.name
        assert report.decision == ("abnormal" if report.probability >= report.operating_point.threshold else "normal")
        assert report.operating_point.method == "youden"  # stored in the checkpoint by training
        assert len(report.model.weights_sha256) == 64
        # the mask and saliency maps are in the input's own geometry
        source = cohort / report.source.path
        study = load_study(source)
        mask = nib.load(d / "mask.nii.gz")
        assert mask.shape == study.spatial_shape
        np.testing.assert_allclose(mask.affine, study.affine, atol=1e-5)
        if report.source.format == "nifti":
            np.testing.assert_allclose(mask.affine, nib.load(source).affine, atol=1e-6)
        sal = nib.load(d / "saliency_gradcam.nii.gz").get_fdata()
        assert sal.shape == study.spatial_shape and sal.min() >= 0.0 and sal.max() <= 1.0 + 1e-6
        # lesion volume is what the mask says
        labels = np.asarray(mask.dataobj)
        voxel_ml = float(np.prod(study.spacing)) / 1000
        listed = sum(les.volume_ml for les in report.lesions)  # a study called normal lists none (and masks none)
        assert listed == pytest.approx(np.count_nonzero(labels == 1) * voxel_ml, abs=1e-3)
        assert report.lesions or report.decision == "normal"
        html = (d / "report.html").read_text()
        # self-contained: the viewer's script is inline, nothing is fetched
        assert "data:image/png;base64," in html and 'src="http' not in html and "<script src" not in html
        assert f"{report.probability:.3f}" in html
    assert formats.count("dicom") == N_STUDIES and formats.count("nifti") == N_STUDIES


def test_dicom_seg_frames_match_mask_and_source_geometry(inferred: Path, cohort: Path) -> None:
    import highdicom as hd

    checked = 0
    for d in study_dirs(inferred):
        report = json.loads((d / "report.json").read_text())
        if report["source"]["format"] != "dicom":
            continue
        mask = np.asarray(nib.load(d / "mask.nii.gz").dataobj)
        seg = hd.seg.segread(d / "seg.dcm")
        raw = pydicom.dcmread(d / "seg.dcm")
        sources = {
            ds.SOPInstanceUID: ds
            for ds in (
                pydicom.dcmread(p, stop_before_pixels=True) for p in (cohort / report["source"]["path"]).iterdir()
            )
        }
        assert raw.ReferencedSeriesSequence[0].SeriesInstanceUID == report["source"]["series_uid"]
        assert raw.StudyInstanceUID == next(iter(sources.values())).StudyInstanceUID
        assert raw.FrameOfReferenceUID == next(iter(sources.values())).FrameOfReferenceUID
        # rebuild the volume from the SEG frames, via each frame's source instance
        order = sorted(
            sources.values(),
            key=lambda ds: float(
                np.dot(
                    ds.ImagePositionPatient, np.cross(ds.ImageOrientationPatient[:3], ds.ImageOrientationPatient[3:])
                )
            ),
        )
        k_of = {ds.SOPInstanceUID: k for k, ds in enumerate(order)}
        rebuilt = np.zeros_like(mask)
        pixels = raw.pixel_array.reshape(-1, raw.Rows, raw.Columns)
        for frame, item in zip(pixels, raw.PerFrameFunctionalGroupsSequence, strict=True):
            uid = item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
            src = sources[uid]
            assert [float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient] == pytest.approx(
                [float(v) for v in src.ImagePositionPatient], abs=1e-4
            )
            ident = item if "SegmentIdentificationSequence" in item else raw.SharedFunctionalGroupsSequence[0]
            number = ident.SegmentIdentificationSequence[0].ReferencedSegmentNumber
            rebuilt[:, :, k_of[uid]][frame.T > 0] = number
        np.testing.assert_array_equal(rebuilt, mask)
        assert seg.SeriesInstanceUID != report["source"]["series_uid"]
        sr = hd.sr.srread(d / "sr.dcm")
        assert sr.StudyInstanceUID == raw.StudyInstanceUID
        assert raw.SOPInstanceUID.encode() in (d / "sr.dcm").read_bytes()  # the SR references the SEG
        checked += 1
    assert checked == N_STUDIES


def test_an_anatomy_model_reports_structures_and_no_verdict(cohort: Path, tmp_path: Path) -> None:
    """A segmentation model of normal structures: volumes as structures, no probability, no decision, no
    Normality in the SR, the SEG codes Anatomical Structure, the worklist says 'no verdict'."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    manifest = synthesize_cohort(tmp_path / "c", n=6, dims=3, fmt="nifti", seed=4)
    raw = {
        "name": "anatomy3d",
        "data": {
            "manifest": str(manifest), "task": "segmentation", "mask_kind": "anatomy", "spatial_dims": 3,
            "intensity": "ct_soft_tissue", "spacing": [1.5, 1.5, 2.5], "spatial_size": [32, 32, 16],
            "patch_size": [32, 32, 16],
        },
        "model": {"name": "hybrid_tiny_3d"},
        "train": {"batch_size": 2, "stages": [{"epochs": 1, "lr": 0.003}]},
        "eval": {"metrics": ["dice", "loss"], "select": "dice"},
        "runtime": {"seed": 0, "threads": 2},
    }  # fmt: skip
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(raw))
    train(load_pipeline(tmp_path / "p.yaml"), tmp_path / "run")
    result = run_inference(cohort / "dicom", tmp_path / "run", tmp_path / "out")
    assert len(result.done) == N_STUDIES and not result.failed
    for d in study_dirs(tmp_path / "out"):
        report = StudyReport.model_validate(json.loads((d / "report.json").read_text()))
        assert report.probability is None and report.decision is None and report.operating_point is None
        assert report.lesions == [] and [s.name for s in report.structures] == ["lesion"]
        assert "NO VERDICT" in (d / "report.html").read_text()
        seg = pydicom.dcmread(d / "seg.dcm")
        assert seg.SegmentSequence[0].SegmentedPropertyCategoryCodeSequence[0].CodeValue == "91723000"
        sr = hd.sr.srread(d / "sr.dcm").content
        assert sr.get_image_measurement_groups() == []  # no Normality evaluation
        assert sr.get_volumetric_roi_measurement_groups()[0].get_measurements(name=codes.SCT.NumberOfLesions) == []
    rows = list(csv.DictReader((tmp_path / "out" / "summary.csv").open()))
    assert {r["probability"] for r in rows} == {""} and {r["decision"] for r in rows} == {""}
    assert "no verdict" in (tmp_path / "out" / "index.html").read_text()


def test_summary_and_index_sorted_by_probability(inferred: Path) -> None:
    rows = list(csv.DictReader((inferred / "summary.csv").open()))
    probs = [float(r["probability"]) for r in rows]
    assert probs == sorted(probs, reverse=True) and len(rows) == 2 * N_STUDIES
    assert [int(r["rank"]) for r in rows] == list(range(1, len(rows) + 1))
    index = (inferred / "index.html").read_text()
    positions = [index.index(f"{r['study_key']}/report.html") for r in rows]
    assert positions == sorted(positions)
    # every local link and image in the pages exists
    for page in [inferred / "index.html", *(d / "report.html" for d in study_dirs(inferred))]:
        for ref in re.findall(r'(?:href|src)="([^"]+)"', page.read_text()):
            if not ref.startswith("data:"):
                assert (page.parent / ref).is_file(), (page, ref)


def test_failures_are_listed_and_do_not_stop_the_batch(cohort: Path, run_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "in"
    shutil.copytree(cohort / "nifti", folder / "nifti")
    (folder / "broken.nii.gz").write_bytes(b"not a nifti file at all")
    shutil.copytree(cohort / "dicom" / "synth_0000", folder / "dicom_bad")
    first = sorted((folder / "dicom_bad").iterdir())[3]
    first.write_bytes(first.read_bytes()[: len(first.read_bytes()) // 2])  # truncated pixel data
    result = run_inference(folder, run_dir, tmp_path / "out", InferOptions(dicom_outputs=False))
    assert len(result.done) == N_STUDIES
    reasons = {f["source"]: f for f in result.failed}
    assert reasons["broken.nii.gz"]["error"] == "image_read"
    # the truncated file is named (rejected by the header pass), and its series, now a slice short, is rejected
    assert reasons[str(Path("dicom_bad") / first.name)]["error"] == "truncated_file"
    assert reasons["dicom_bad"]["error"] == "no_series" and "QC reject" in reasons["dicom_bad"]["reason"]
    rows = list(csv.DictReader((tmp_path / "out" / "summary.csv").open()))
    assert sum(r["status"] == "failed" for r in rows) == len(result.failed) == 3
    index = (tmp_path / "out" / "index.html").read_text()
    assert "Failed" in index and "broken.nii.gz" in index


def test_rerun_skips_finished_studies_unless_overwrite(cohort: Path, run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    options = InferOptions(dicom_outputs=False)
    run_inference(cohort / "nifti", run_dir, out, options)
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("report.json")}
    again = run_inference(cohort / "nifti", run_dir, out, options)
    assert len(again.skipped) == N_STUDIES and {p: p.stat().st_mtime_ns for p in out.rglob("report.json")} == stamps
    redo = run_inference(cohort / "nifti", run_dir, out, InferOptions(dicom_outputs=False, overwrite=True))
    assert not redo.skipped and all(p.stat().st_mtime_ns != stamps[p] for p in stamps)


def test_rerun_redoes_studies_reported_by_another_model_or_decision_setting(
    cohort: Path, run_dir: Path, tmp_path: Path
) -> None:
    """The skip key is the run key (weights, threshold, temperature, TTA, outputs), not the folder alone."""
    from medhybrid.train.checkpoint import load_checkpoint, save_checkpoint

    out = tmp_path / "out"
    run_inference(cohort / "nifti", run_dir, out, InferOptions(dicom_outputs=False))
    again = run_inference(cohort / "nifti", run_dir, out, InferOptions(dicom_outputs=False))
    assert len(again.skipped) == N_STUDIES
    other_threshold = run_inference(cohort / "nifti", run_dir, out, InferOptions(dicom_outputs=False, threshold=0.99))
    assert not other_threshold.skipped and {r["threshold"] for r in other_threshold.done} == {0.99}
    with_tta = run_inference(
        cohort / "nifti", run_dir, out, InferOptions(dicom_outputs=False, threshold=0.99, tta=True)
    )
    assert not with_tta.skipped
    ckpt = load_checkpoint(run_dir / "best.pt")
    key = next(iter(ckpt["model"]))
    ckpt["model"][key] = ckpt["model"][key] + 0.01  # other weights
    save_checkpoint(tmp_path / "other.pt", {k: v for k, v in ckpt.items() if k not in ("format", "format_version")})
    other_model = run_inference(cohort / "nifti", tmp_path / "other.pt", out, InferOptions(dicom_outputs=False))
    assert not other_model.skipped
    reports = [json.loads(p.read_text()) for p in out.rglob("report.json")]
    assert {r["model"]["checkpoint"] for r in reports} == {"other.pt"} and len({r["run_key"] for r in reports}) == 1


def test_kill_mid_run_leaves_no_half_report_and_rerun_completes(cohort: Path, run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = ["infer", str(cohort), "--model", str(run_dir), "--out", str(out)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "medhybrid", *args], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (not out.is_dir() or len(study_dirs(out)) < 2):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = study_dirs(out)
    assert 2 <= len(done_before) < 2 * N_STUDIES, "the kill came too late to test anything"
    for d in done_before:  # what exists is complete
        assert {p.name for p in d.iterdir()} >= COMMON
    result = run_cli([*args])
    assert result.returncode == 0, result.stderr
    assert "already done" in result.stderr
    dirs = study_dirs(out)
    assert len(dirs) == 2 * N_STUDIES
    for d in dirs:
        report = json.loads((d / "report.json").read_text())
        expected = COMMON | (DICOM_ONLY if report["source"]["format"] == "dicom" else set())
        assert expected <= {p.name for p in d.iterdir()}
    leftovers = [p for p in out.rglob("*") if p.name.startswith((".partial-", ".old-")) or p.name.endswith(".tmp")]
    assert not leftovers


def test_no_patient_identity_in_any_output_or_log(cohort: Path, run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = run_cli(["-vv", "infer", str(cohort / "dicom"), "--model", str(run_dir), "--out", str(out)])
    assert result.returncode == 0, result.stderr
    identities = [_fake_identity(index) for index in range(N_STUDIES)]
    whole = {v for ident in identities for v in ident}  # "DOE^JANE", the ID, the birth date
    parts = {p for name, _, _ in identities for p in name.split("^") if len(p) >= 3}
    texts = {"stdout": result.stdout, "stderr": result.stderr}
    binaries: dict[str, str] = {}
    for path in out.rglob("*"):
        texts[f"file name {path}"] = path.name
        if not path.is_file():
            continue
        data = path.read_bytes()
        if path.suffix in (".html", ".json", ".csv", ".log"):
            # embedded PNGs are pixels in base64, whose letters form short words by chance
            texts[str(path)] = re.sub(r"data:[\w/+.-]+;base64,[A-Za-z0-9+/=]+", "", data.decode("utf-8"))
        else:  # DICOM, NIfTI (decompressed), PNG
            binaries[str(path)] = (gzip.decompress(data) if path.name.endswith(".gz") else data).decode("latin-1")
    found = {(n, where) for n in whole | parts for where, text in texts.items() if n in text}
    found |= {(n, where) for n in whole for where, text in binaries.items() if n in text}
    found |= {
        (n.replace("^", " "), where) for n in whole for where, text in texts.items() if n.replace("^", " ") in text
    }
    assert not found, sorted(found)[:5]
    assert any(p.endswith("seg.dcm") for p in binaries) and any(p.endswith("infer.log") for p in texts)
    # the check can fail: with --include-phi the identities are there
    out_phi = tmp_path / "phi"
    assert (
        run_cli(
            ["infer", str(cohort / "dicom"), "--model", str(run_dir), "--out", str(out_phi), "--include-phi"]
        ).returncode
        == 0
    )
    text = "".join(p.read_text() for p in out_phi.rglob("report.json"))
    assert _fake_identity(0)[1] in text


def test_cli_errors_are_one_line(cohort: Path, tmp_path: Path) -> None:
    result = run_cli(["infer", str(cohort), "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    assert result.returncode == 1 and "nope" in result.stderr and "fix:" in result.stderr
    assert "Traceback" not in result.stderr


# --- building blocks -------------------------------------------------------------------------------
def test_to_native_inverts_a_resampled_flipped_grid() -> None:
    native = np.diag([-0.75, -0.75, 2.5, 1.0])
    native[:3, 3] = [10.0, 20.0, -30.0]
    labels = np.zeros((20, 18, 6), dtype=np.int64)
    labels[4:12, 6:14, 1:5] = 1
    labels[14:16, 0:2, 0:6] = 2
    # model grid: 2x coarser in i and j and flipped along i (as Orientation + Spacing would give);
    # model voxel (a, b, c) sits at native (18.5 - 2a, 0.5 + 2b, c)
    to_native_voxel = np.array([[-2.0, 0, 0, 18.5], [0, 2.0, 0, 0.5], [0, 0, 1, 0], [0, 0, 0, 1]])
    model = native @ to_native_voxel
    one_hot = torch.zeros(3, 10, 9, 6)
    for a in range(10):
        for b in range(9):
            for c in range(6):
                one_hot[labels[18 - 2 * a, 2 * b, c], a, b, c] = 1.0  # the 2x2 block under the model voxel
    back = to_native(one_hot, model, native, labels.shape, argmax_labels, mode="nearest")
    np.testing.assert_array_equal(back, labels)
    # linear interpolation keeps the argmax inside regions and changes at most the boundary voxels
    smooth = to_native(one_hot, model, native, labels.shape, argmax_labels, mode="bilinear")
    assert (smooth == labels).mean() > 0.9 and smooth[8, 10, 3] == 1


def test_to_native_outside_the_model_field_is_zero() -> None:
    aff = np.eye(4)
    model = np.eye(4)
    model[0, 3] = 10.0  # model grid starts 10 voxels further along i
    vol = torch.ones(1, 5, 4, 3)
    out = to_native(vol, model, aff, (20, 4, 3), lambda v: v[0], dtype=np.float32)
    assert out[:10].max() == 0 and out[10:15].min() == 1 and out[15:].max() == 0


def test_rollout_is_a_distribution_over_tokens() -> None:
    maps = [torch.softmax(torch.randn(1, 2, 9, 9), -1) for _ in range(3)]
    r = rollout(maps, (2, 2, 2), use_cls=True)
    assert r.shape == (1, 1, 2, 2, 2)
    assert torch.all(r > 0)
    # one block of pure self-attention leaves only the identity: the CLS row ignores the tokens
    identity = [torch.eye(9).expand(1, 2, 9, 9)]
    assert torch.allclose(rollout(identity, (2, 2, 2), True), torch.zeros(1, 1, 2, 2, 2))


def test_operating_point_rules() -> None:
    truth = np.array([0, 0, 0, 0, 1, 1, 1, 1], dtype=bool)
    score = np.array([0.1, 0.2, 0.3, 0.6, 0.4, 0.7, 0.8, 0.9])
    youden = operating_point(truth, score)
    assert youden["threshold"] == pytest.approx(0.7) and youden["sensitivity"] == 0.75 and youden["specificity"] == 1.0
    sens = operating_point(truth, score, EvalConfig(operating_point=MinSensitivity(min_sensitivity=1.0)))
    assert sens["threshold"] == pytest.approx(0.4) and sens["sensitivity"] == 1.0 and sens["specificity"] == 0.75
    fixed = operating_point(truth, score, EvalConfig(operating_point=0.5))
    assert fixed["threshold"] == 0.5 and fixed["method"] == "fixed" and fixed["specificity"] == 0.75


def test_measure_lesions_counts_components_and_volume() -> None:
    labels = np.zeros((30, 30, 10), dtype=np.uint8)
    labels[2:5, 2:5, 2:4] = 1  # 18 voxels
    labels[20:22, 20:22, 5:6] = 1  # 4 voxels, separate
    labels[10, 10, 1] = 2
    lesions = measure_lesions(labels, (0.5, 0.5, 2.0), {0: "bg", 1: "lesion", 2: "cyst"})
    assert [(les.name, les.voxels, les.components) for les in lesions] == [("lesion", 22, 2), ("cyst", 1, 1)]
    assert lesions[0].volume_ml == pytest.approx(22 * 0.5 / 1000) and lesions[0].largest_component_ml == pytest.approx(
        18 * 0.5 / 1000
    )


def test_display_is_the_same_for_las_and_ras_storage() -> None:
    vol = np.random.default_rng(0).random((6, 5, 4))
    ras = np.diag([1.0, 1.0, 2.0, 1.0])
    las = ras.copy()
    las[0, 0] = -1.0
    las[0, 3] = 5.0  # voxel 0 along i is now at x = 5 (the other end)
    a = DisplayFrame(ras, (1, 1, 2), two_d=False)(vol)
    b = DisplayFrame(las, (1, 1, 2), two_d=False)(vol[::-1])
    np.testing.assert_array_equal(a, b)


def test_2d_display_is_the_display_frame_for_every_source() -> None:
    """A 2D image is shown as the model saw it: stored order for a PNG/geometry-less DICOM and a standard
    coronal DX; a slice stored upside down is shown the right way up."""
    img = np.random.default_rng(1).random((6, 5, 1))
    geometryless = np.diag([-1.0, -1.0, 1.0, 1.0])
    coronal = np.array([[-1.0, 0, 0, 0], [0, 0, 1.0, 0], [0, -1.0, 0, 0], [0, 0, 0, 1]])
    for affine in (geometryless, coronal):
        np.testing.assert_array_equal(DisplayFrame(affine, (1, 1, 1), two_d=True)(img), img)
    upside_down = geometryless @ np.diag([1.0, -1.0, 1.0, 1.0])
    np.testing.assert_array_equal(DisplayFrame(upside_down, (1, 1, 1), two_d=True)(img), img[:, ::-1])


def test_key_slices_follow_the_lesion() -> None:
    labels = np.zeros((8, 8, 40), dtype=np.uint8)
    labels[2:6, 2:6, 30] = 1
    labels[2:4, 2:4, 10] = 1
    labels[2:3, 2:3, 31] = 1
    assert key_slices(labels, None, 40) == [10, 30]
    assert key_slices(None, None, 40) == [20]


def test_report_schema_doc_is_current() -> None:
    doc = (REPO / "docs" / "report-schema.md").read_text()
    assert schema_markdown() in doc, "regenerate docs/report-schema.md: python -m medhybrid.infer.report"


# --- the pages in a real browser ---------------------------------------------------------------------
def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("no Chromium on this machine (`make test` installs Debian's chromium where it can: apt-get as root)")


def render_page(browser: str, page: Path, png: Path) -> str:
    """Headless Chromium renders ``page`` to ``png``; returns its console messages (INFO:CONSOLE lines)."""
    result = subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--enable-logging=stderr",
            "--v=0",
            f"--screenshot={png}",
            "--window-size=1280,1600",
            page.resolve().as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert png.is_file(), result.stderr[-2000:]
    return "\n".join(line for line in result.stderr.splitlines() if ":CONSOLE" in line)


def test_pages_render_in_headless_chromium_without_console_errors(inferred: Path, tmp_path: Path) -> None:
    from PIL import Image

    browser = chromium()
    # the console check can fail: a page with a script error is caught
    bad = tmp_path / "bad.html"
    bad.write_text(
        "<!DOCTYPE html><html><body><script>console.error('boom'); missingFunction();</script></body></html>"
    )
    assert "missingFunction" in render_page(browser, bad, tmp_path / "bad.png")
    pages = [inferred / "index.html", *(d / "report.html" for d in study_dirs(inferred)[:2])]
    for n, page in enumerate(pages):
        png = tmp_path / f"page{n}.png"
        console = render_page(browser, page, png)
        assert console == "", f"{page}: {console}"
        pixels = np.asarray(Image.open(png).convert("L"), dtype=np.float32)
        assert pixels.std() > 10, f"{page} rendered blank"
        # the embedded images were decoded: the page holds dark (CT background) pixels, not just text on white
        assert (pixels < 30).mean() > 0.01, f"{page}: no image content rendered"


def test_tta_averages_flips_into_valid_probabilities(cohort: Path, run_dir: Path) -> None:
    from medhybrid.infer.predictor import Predictor

    study = load_study(cohort / "nifti" / "synth_0000.nii.gz")
    plain = Predictor(run_dir).predict(study)
    tta = Predictor(run_dir, tta=True).predict(study)
    assert tta.seg_probs is not None and plain.seg_probs is not None
    assert torch.allclose(tta.seg_probs.sum(0), torch.ones(()), atol=1e-5)
    assert 0.0 <= tta.probability <= 1.0 and tta.probability != plain.probability
    assert set(tta.saliency) == set(plain.saliency) == {"gradcam", "attention"}


def test_tta_flips_every_mask_back(run_dir: Path) -> None:
    """For a voxel-wise model (flip-equivariant), TTA must give exactly the plain mask: each flipped pass is
    flipped back before it is averaged. Left flipped, the average would blur an asymmetric mask."""
    from torch import nn

    from medhybrid.infer.loading import Member
    from medhybrid.infer.predictor import Predictor, Prepared
    from medhybrid.infer.saliency import Explainer

    class Voxelwise(nn.Module):
        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            f = 10.0 * (x - 0.5)
            return {"seg_logits": torch.cat([-f, f], 1)}

    predictor = Predictor(run_dir, device="cpu", saliency=())
    m = predictor.members[0]
    predictor.members = [Member(m.path, Voxelwise(), Explainer(Voxelwise(), ()), m.ckpt, m.digest)]
    x = torch.zeros(1, 1, 32, 32, 16)
    x[0, 0, 2:9, 20:30, 1:5] = 1.0  # off-centre along every axis
    prepared = Prepared(x, np.eye(4), np.eye(4), 0.0)
    plain = predictor.run(prepared, explain=False).seg_probs
    predictor.tta = True
    tta = predictor.run(prepared, explain=False).seg_probs
    assert plain is not None and tta is not None
    assert torch.allclose(tta, plain, atol=1e-6)
    assert float(tta[1].max()) > 0.99  # the object is there, at full probability


@pytest.mark.parametrize(
    "native",
    [
        np.diag([-0.7, -0.7, 1.25, 1.0]),  # an axial CT against a 1.5 mm RAS model grid: flips and scales
        np.array([[0.9, 0, 0, -3.1], [0, -1.1, 0, 7.3], [0, 0, 2.0, -1.7], [0, 0, 0, 1]]),
    ],
)
def test_the_separable_path_samples_what_grid_sample_samples(
    native: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The axis-aligned fast path against the general one on the same inputs: equal to 1e-5, field of view
    (zeros outside, coverage) included."""
    from medhybrid.infer import resample

    gen = torch.Generator().manual_seed(0)
    vol = torch.rand(3, 17, 13, 9, generator=gen)
    model = np.diag([1.5, 1.5, 2.5, 1.0])
    model[:3, 3] = [-4.0, -6.0, 2.0]
    shape = (40, 31, 14)
    assert resample._axis_aligned((np.linalg.inv(model) @ native)[:3, :3])  # the first call takes the fast path

    def mix(v: torch.Tensor) -> torch.Tensor:  # every channel counts, each with its own weight
        return v[0] + 2 * v[1] + 4 * v[2]

    fast_cov: list[float] = []
    fast = resample.to_native_many([(vol, mix, np.float32)], model, native, shape, coverage=fast_cov)[0]
    monkeypatch.setattr(resample, "_separable", lambda *a: pytest.fail("fast path used"))
    monkeypatch.setattr(resample, "_axis_aligned", lambda m: False)
    slow_cov: list[float] = []
    slow = resample.to_native_many([(vol, mix, np.float32)], model, native, shape, coverage=slow_cov)[0]
    assert (slow == 0).any() and (slow != 0).any()  # part of the native grid lies outside the model's
    np.testing.assert_allclose(fast, slow, atol=1e-5)
    assert fast_cov == pytest.approx(slow_cov)


def test_argmax_labels_is_argmax_with_first_channel_ties() -> None:
    gen = torch.Generator().manual_seed(1)
    probs = torch.randint(0, 4, (3, 8, 7, 6), generator=gen).float()  # many ties
    probs[:, 0] = 0.0  # a plane outside the field of view: every channel 0 -> label 0
    labels = argmax_labels(probs[:, :, :, 1:5])  # a sliced slab, as to_native passes
    assert labels.dtype == torch.uint8
    torch.testing.assert_close(labels, probs[:, :, :, 1:5].argmax(0).to(torch.uint8))
    assert not labels[0].any()
