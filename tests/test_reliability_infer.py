"""``medhybrid infer`` under faults: failed outputs, its own outputs in the input, empty input, a dying
decoder, two runs on one folder, kills at several points, a full disk, and damaged finished studies."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pydicom
import pytest

import medhybrid.infer.batch as batch
from medhybrid.errors import InferenceError, InputError
from medhybrid.infer.batch import InferOptions, run_inference
from medhybrid.infer.lock import output_lock
from medhybrid.infer.report import StudyReport
from tests.conftest import INFER_STUDIES

REPO = Path(__file__).resolve().parents[1]


def run_cli(args: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "medhybrid", *args], capture_output=True, text=True, cwd=REPO, **kw)


def study_dirs(out: Path) -> list[Path]:
    return sorted(p for p in out.iterdir() if p.is_dir() and not p.name.startswith("."))


def reports(out: Path) -> dict[str, StudyReport]:
    return {d.name: StudyReport.model_validate_json((d / "report.json").read_text()) for d in study_dirs(out)}


def assert_complete(folder: Path) -> None:
    """A study folder is complete: its report lists files that all exist with the recorded digests."""
    from medhybrid.io.writers import sha256_file

    report = StudyReport.model_validate_json((folder / "report.json").read_text())
    assert set(report.outputs.files()) == set(report.outputs.sha256)
    for name, digest in report.outputs.sha256.items():
        assert sha256_file(folder / name) == digest, (folder, name)


def dicom_copy(cohort: Path, dest: Path, n: int = INFER_STUDIES) -> Path:
    for i in range(n):
        shutil.copytree(cohort / "dicom" / f"synth_{i:04d}", dest / f"synth_{i:04d}")
    return dest


# --- one failed output never loses the others -----------------------------------------------------------------


def test_a_failing_dicom_seg_keeps_every_other_output(
    infer_cohort: Path, tiny_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import medhybrid.infer.dicom_out as dicom_out

    def broken_seg(*args: Any, **kwargs: Any) -> None:
        raise ValueError("highdicom refused the source header")

    monkeypatch.setattr(dicom_out, "write_seg", broken_seg)
    folder = dicom_copy(infer_cohort, tmp_path / "in", n=2)
    result = run_inference(folder, tiny_run, tmp_path / "out")
    assert len(result.done) == 2 and not result.failed
    for d in study_dirs(tmp_path / "out"):
        report = StudyReport.model_validate_json((d / "report.json").read_text())
        assert [(e.output, e.code) for e in report.output_errors] == [("dicom_seg", "ValueError")]
        assert report.outputs.dicom_seg is None and not (d / "seg.dcm").exists()
        assert (d / "sr.dcm").is_file() and (d / "mask.nii.gz").is_file() and (d / "report.html").is_file()
        assert "output_failed" in {f.code for f in report.qc}
        assert "dicom_seg" in (d / "report.html").read_text()
        assert_complete(d)
    assert {r["error"] for r in result.done} == {"output_failed"}
    assert "seg not written" in (tmp_path / "out" / "summary.csv").read_text().replace("dicom_", "")


def test_an_empty_character_set_is_the_default_repertoire(infer_cohort: Path, tiny_run: Path, tmp_path: Path) -> None:
    """Real Hitachi CT headers carry SpecificCharacterSet with an empty value; SEG and SR are still written."""
    folder = dicom_copy(infer_cohort, tmp_path / "in", n=1)
    for f in folder.rglob("*.dcm"):
        ds = pydicom.dcmread(f)
        ds.SpecificCharacterSet = ""
        ds.save_as(f)
    result = run_inference(folder, tiny_run, tmp_path / "out")
    assert len(result.done) == 1 and result.done[0]["error"] == ""
    (d,) = study_dirs(tmp_path / "out")
    assert (d / "seg.dcm").is_file() and (d / "sr.dcm").is_file()
    assert str(pydicom.dcmread(d / "sr.dcm").get("SpecificCharacterSet", "ISO_IR 100")) in ("ISO_IR 100", "")


def test_a_file_in_a_private_syntax_is_named_failed_and_the_batch_goes_on(
    infer_cohort: Path, tiny_run: Path, tmp_path: Path
) -> None:
    folder = dicom_copy(infer_cohort, tmp_path / "in", n=2)
    odd = tmp_path / "in" / "ge"
    odd.mkdir()
    ds = pydicom.dcmread(sorted((folder / "synth_0000").iterdir())[0])
    ds.file_meta.TransferSyntaxUID = "1.2.840.113619.5.2"
    ds.SeriesInstanceUID = ds.StudyInstanceUID = ds.SOPInstanceUID = "1.2.3.4.5.6"
    ds.save_as(odd / "IM0001.dcm", enforce_file_format=True)
    proc = run_cli(["infer", str(tmp_path / "in"), "--model", str(tiny_run), "--out", str(tmp_path / "out")])
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert "2 studies reported" in proc.stdout and "1 failed" in proc.stdout
    summary = (tmp_path / "out" / "summary.csv").read_text()
    assert "unsupported_syntax" in summary and "IM0001.dcm" in summary


# --- what is read, and what is not -------------------------------------------------------------------------


def test_an_out_folder_inside_the_input_is_never_read(infer_cohort: Path, tiny_run: Path, tmp_path: Path) -> None:
    folder = tmp_path / "in"
    shutil.copytree(infer_cohort / "nifti", folder)
    out = folder / "reports"
    first = run_inference(folder, tiny_run, out, InferOptions(overwrite=True))
    second = run_inference(folder, tiny_run, out, InferOptions(overwrite=True))
    assert len(first.done) == len(second.done) == INFER_STUDIES
    assert all("reports" not in r["source"] for r in second.done)
    # moved elsewhere, a study folder still says it is medhybrid's own
    moved = tmp_path / "in2"
    shutil.copytree(infer_cohort / "nifti", moved)
    shutil.copytree(study_dirs(out)[0], moved / "old_report")
    third = run_inference(moved, tiny_run, tmp_path / "out3")
    assert len(third.done) == INFER_STUDIES and not third.failed


def test_an_empty_input_or_one_of_only_junk_fails_clearly(tiny_run: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = run_cli(["infer", str(empty), "--model", str(tiny_run), "--out", str(tmp_path / "o1")])
    assert proc.returncode == 1 and "no study found" in proc.stderr and "Traceback" not in proc.stderr
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "IM0001").write_bytes(b"\x08\x00" + b"\x00" * 300)  # looks like a bare data set, is not
    with pytest.raises(InputError, match=r"no study found: 1 file\(s\) rejected \(IM0001"):
        run_inference(junk, tiny_run, tmp_path / "o2")


def test_a_dicomdir_given_as_input_reads_its_media(infer_cohort: Path, tiny_run: Path, tmp_path: Path) -> None:
    from pydicom.fileset import FileSet

    media = tmp_path / "media"
    fs = FileSet()
    for f in sorted((infer_cohort / "dicom" / "synth_0000").iterdir()):
        fs.add(pydicom.dcmread(f))
    fs.write(media)
    result = run_inference(media / "DICOMDIR", tiny_run, tmp_path / "out")
    assert len(result.done) == 1 and not result.failed


# --- a dying decoder, two runs, kills, a full disk --------------------------------------------------------


class FakePanic(BaseException):
    """What a Rust decoder raises (``pyo3_runtime.PanicException`` derives from BaseException)."""


def test_a_decoder_panic_fails_one_study_and_the_batch_goes_on(
    infer_cohort: Path, tiny_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = batch.load_series
    calls = []

    def panicking(series: Any) -> Any:
        calls.append(series)
        if len(calls) == 2:
            raise FakePanic("index out of bounds: the len is 8192 but the index is 8192")
        return real(series)

    monkeypatch.setattr(batch, "load_series", panicking)
    folder = dicom_copy(infer_cohort, tmp_path / "in", n=4)
    result = run_inference(folder, tiny_run, tmp_path / "out", InferOptions(dicom_outputs=False))
    assert len(result.done) == 3 and [f["error"] for f in result.failed] == ["FakePanic"]


def test_a_second_run_on_the_same_out_is_refused(infer_cohort: Path, tiny_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    with output_lock(out):  # as a first run holds it
        proc = run_cli(["infer", str(infer_cohort / "nifti"), "--model", str(tiny_run), "--out", str(out)])
    assert proc.returncode == 1 and "another medhybrid infer" in proc.stderr and "Traceback" not in proc.stderr
    assert not study_dirs(out)
    # once the first run is gone (its lock with it, even after SIGKILL) a run proceeds
    assert len(run_inference(infer_cohort / "nifti", tiny_run, out, InferOptions(dicom_outputs=False)).done) == 6


@pytest.mark.parametrize("kill_after", [1, INFER_STUDIES])
def test_kill_at_any_point_then_rerun_gives_the_uninterrupted_result(
    infer_cohort: Path, tiny_run: Path, tmp_path: Path, kill_after: int
) -> None:
    """SIGKILL once ``kill_after`` study folders exist (or on the first partial folder of the last study):
    everything left looks complete only if it is, and a rerun gives the uninterrupted run's reports."""
    reference = tmp_path / "reference"
    run_inference(infer_cohort, tiny_run, reference)
    out = tmp_path / "out"
    args = ["infer", str(infer_cohort), "--model", str(tiny_run), "--out", str(out)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "medhybrid", *args], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and (not out.is_dir() or len(study_dirs(out)) < kill_after):
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    left = study_dirs(out)
    assert kill_after <= len(left) < 2 * INFER_STUDIES, "the kill came too late to test anything"
    for d in left:
        assert_complete(d)
    again = run_cli(args)
    assert again.returncode == 0, again.stderr
    got, want = reports(out), reports(reference)
    assert got.keys() == want.keys()
    for key, report in got.items():
        assert report.probability == want[key].probability and report.lesions == want[key].lesions
        assert report.outputs.sha256["mask.nii.gz"] == want[key].outputs.sha256["mask.nii.gz"]
    assert not [p for p in out.rglob("*") if p.name.startswith((".partial-", ".old-")) or p.name.endswith(".tmp")]


def test_a_damaged_finished_study_is_redone(infer_cohort: Path, tiny_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    options = InferOptions(dicom_outputs=False)
    run_inference(infer_cohort / "nifti", tiny_run, out, options)
    first, second = study_dirs(out)[:2]
    (first / "mask.nii.gz").write_bytes(b"overwritten by another process")
    (second / "saliency_gradcam.nii.gz").unlink()
    again = run_inference(infer_cohort / "nifti", tiny_run, out, options)
    assert len(again.skipped) == INFER_STUDIES - 2
    assert_complete(first)
    assert_complete(second)


@pytest.fixture
def small_disk(tmp_path: Path) -> Any:
    mount = tmp_path / "disk"
    mount.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=700k", "tmpfs", str(mount)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {proc.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_stops_with_a_clear_error_and_no_partial_file(
    infer_cohort: Path, tiny_run: Path, small_disk: Path
) -> None:
    out = small_disk / "out"
    proc = run_cli(["infer", str(infer_cohort / "nifti"), "--model", str(tiny_run), "--out", str(out)])
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    (line,) = [ln for ln in proc.stderr.splitlines() if "cannot write to the output folder" in ln]
    assert "No space left on device" in line and "free disk space and rerun" in line
    finished = study_dirs(out)
    assert len(finished) < INFER_STUDIES
    for d in finished:
        assert_complete(d)
    assert not [p for p in out.rglob("*") if p.name.startswith((".partial-", ".old-")) or p.name.endswith(".tmp")]


def test_summary_write_failure_is_typed(
    infer_cohort: Path, tiny_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_space(*args: Any, **kwargs: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(batch._Book, "write_summary", no_space)
    with pytest.raises(InferenceError, match="No space left on device"):
        run_inference(infer_cohort / "nifti", tiny_run, tmp_path / "out", InferOptions(dicom_outputs=False))
    assert json.loads((study_dirs(tmp_path / "out")[0] / "report.json").read_text())["status"] == "ok"
