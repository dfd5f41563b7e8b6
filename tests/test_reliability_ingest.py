"""Ingestion never stops on a file: one test per class of defect seen in the field or by the fuzzer
(private transfer syntax, duplicate and partial copies, lying sizes, NaN geometry and rescale, sheared
orientation, decoder panics), each through ``scan_folder``/``data scan`` and ``load_study``."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataelem import DataElement

from medhybrid.data.synth import synthesize_cohort
from medhybrid.errors import CorruptPixelDataError, InvalidGeometryError, MedHybridError
from medhybrid.io.dicom import discover_dicom, load_series
from medhybrid.io.scan import load_study, scan_folder
from medhybrid.io.study import Study

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def series_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One synthetic CT series of 16 slices (DICOM)."""
    root = tmp_path_factory.mktemp("ct")
    synthesize_cohort(root, n=1, dims=3, fmt="dicom", seed=3)
    (folder,) = (root / "dicom").iterdir()
    return folder


def copy_series(series_dir: Path, dest: Path) -> tuple[Path, list[Path]]:
    shutil.copytree(series_dir, dest)
    return dest, sorted(dest.iterdir())


def edit(path: Path, **values: object) -> None:
    ds = pydicom.dcmread(path)
    for keyword, value in values.items():
        tag = pydicom.datadict.tag_for_keyword(keyword)
        vr = pydicom.datadict.dictionary_VR(tag)
        ds[tag] = DataElement(tag, vr, value, validation_mode=pydicom.config.IGNORE)
    pydicom.config.settings.writing_validation_mode, saved = (
        pydicom.config.IGNORE,
        (pydicom.config.settings.writing_validation_mode),
    )
    try:
        ds.save_as(path)
    finally:
        pydicom.config.settings.writing_validation_mode = saved


def scan_cli(folder: Path) -> dict:
    proc = subprocess.run(
        [sys.executable, "-m", "medhybrid", "data", "scan", "--json", str(folder)],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    return json.loads(proc.stdout)


def test_a_private_transfer_syntax_is_a_typed_rejection(series_dir: Path, tmp_path: Path) -> None:
    folder, files = copy_series(series_dir, tmp_path / "s")
    ds = pydicom.dcmread(files[0])
    ds.file_meta.TransferSyntaxUID = "1.2.840.113619.5.2"  # GE private implicit VR big endian
    ds.save_as(files[0], enforce_file_format=True)
    report = scan_cli(folder)
    (rejected,) = report["rejected_files"]
    assert rejected["code"] == "unsupported_syntax" and "1.2.840.113619.5.2" in rejected["reason"]
    with pytest.raises(MedHybridError):
        load_study(files[0])


def test_duplicate_and_partial_copies_never_reject_the_series(series_dir: Path, tmp_path: Path) -> None:
    folder, files = copy_series(series_dir, tmp_path / "s")
    (folder / "copy").mkdir()
    shutil.copy2(files[5], folder / "copy" / files[5].name)  # byte-identical, another folder
    data = files[7].read_bytes()
    (folder / "copy" / "partial.dcm").write_bytes(data[: len(data) - 100])  # truncated inside Pixel Data
    found = discover_dicom(folder)
    (series,) = found.series
    assert series.error is None and series.n_slices == len(files)
    assert "duplicate_files" in {r.code for r in series.qc.reasons}
    assert {p.path.name: p.code for p in found.skipped} == {files[5].name: "duplicate"}
    assert {p.path.name: p.code for p in found.rejected} == {"partial.dcm": "truncated_file"}
    assert folder / "copy" / "partial.dcm" not in series.files  # an unreadable file never joins a series
    assert load_series(series).spatial_shape[2] == len(files)


@pytest.mark.parametrize(
    "values,code",
    [
        ({"NumberOfFrames": "100000"}, "truncated_file"),  # was a hang: a header loop over every claimed frame
        ({"Rows": 65535, "Columns": 65535}, "truncated_file"),  # was a MemoryError: 8 GiB asked by a 30 KB file
        ({"BitsAllocated": 64}, "truncated_file"),
        ({"SamplesPerPixel": 0}, "invalid_tag"),
    ],
    ids=["frames", "size", "bits", "samples"],
)
def test_a_lying_size_is_refused_before_anything_is_allocated(
    series_dir: Path, tmp_path: Path, values: dict, code: str
) -> None:
    folder, files = copy_series(series_dir, tmp_path / "s")
    edit(files[0], **values)
    t0 = time.perf_counter()
    found = discover_dicom(folder, files=[files[0]])
    assert time.perf_counter() - t0 < 2
    assert [p.code for p in found.rejected] == [code]


def test_empty_pixel_data_is_a_typed_rejection(series_dir: Path, tmp_path: Path) -> None:
    folder, files = copy_series(series_dir, tmp_path / "s")
    ds = pydicom.dcmread(files[0])
    ds.PixelData = b""
    ds.save_as(files[0])
    assert [p.code for p in discover_dicom(folder, files=[files[0]]).rejected] == ["truncated_file"]


@pytest.mark.parametrize(
    "values,code",
    [
        ({"RescaleSlope": "nan"}, "invalid_tag"),
        ({"RescaleSlope": "1e308"}, "corrupt_pixel_data"),
        ({"RescaleSlope": "0"}, "invalid_tag"),
        ({"ImagePositionPatient": ["nan", "0", "0"]}, "invalid_tag"),
        ({"PixelSpacing": ["inf", "1"]}, "invalid_tag"),
        ({"ImageOrientationPatient": ["1", "0", "0", "0.5", "0.5", "0"]}, "invalid_tag"),  # not unit, sheared
        ({"ImageOrientationPatient": ["1", "0", "0", "1", "0", "0"]}, "invalid_tag"),  # parallel: singular
    ],
    ids=["slope-nan", "slope-overflow", "slope-zero", "ipp-nan", "spacing-inf", "iop-sheared", "iop-singular"],
)
def test_non_finite_or_degenerate_geometry_and_rescale_never_load_silently(
    series_dir: Path, tmp_path: Path, values: dict, code: str
) -> None:
    folder, files = copy_series(series_dir, tmp_path / "s")
    for f in files:
        edit(f, **values)
    found = discover_dicom(folder)
    codes = {p.code for p in found.rejected} | {s.error.code for s in found.series if s.error is not None}
    for series in found.series:
        if series.error is None:
            with pytest.raises(MedHybridError) as info:
                load_series(series)
            codes.add(info.value.code)
    assert codes == {code}


def test_rounded_orientation_cosines_are_orthonormalised(series_dir: Path, tmp_path: Path) -> None:
    folder, files = copy_series(series_dir, tmp_path / "s")
    for f in files:
        edit(f, ImageOrientationPatient=["1", "0", "0", "0.001", "0.999999", "0"])
    study = load_study(folder)
    cosines = study.affine[:3, :3] / np.linalg.norm(study.affine[:3, :3], axis=0)
    assert np.allclose(cosines.T @ cosines, np.eye(3), atol=1e-12)
    assert "orientation_rounded" in {r.code for r in study.qc.reasons}


def test_a_study_never_carries_an_unusable_grid() -> None:
    for affine in (np.diag([np.nan, 1, 1, 1]), np.diag([1e9, 1, 1, 1]), np.diag([0.0, 1, 1, 1])):
        with pytest.raises(InvalidGeometryError):
            Study("s", np.zeros((2, 2, 2), np.float32), affine, "CT", Path("x.nii.gz"), "nifti")
    sheared = np.eye(4)
    sheared[0, 1] = 0.2
    with pytest.raises(InvalidGeometryError, match="not perpendicular"):
        Study("s", np.zeros((2, 2, 2), np.float32), sheared, "CT", Path("x.nii.gz"), "nifti")


class FakePanic(BaseException):
    """``pyo3_runtime.PanicException`` (pylibjpeg-rle) derives from BaseException, not Exception."""


def test_a_decoder_panic_is_a_typed_error(series_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import medhybrid.io.dicom_pixels as pixels

    def panic(*args: object) -> None:
        raise FakePanic("index out of bounds: the len is 8192 but the index is 8192")

    monkeypatch.setattr(pixels, "_native_frames", panic)
    folder, _ = copy_series(series_dir, tmp_path / "s")
    with pytest.raises(CorruptPixelDataError, match="FakePanic"):
        load_study(folder)
    report = scan_folder(folder)
    assert report.counts()["series_reject"] == 1 and report.rejected[0].code == "corrupt_pixel_data"


def test_an_unknown_vr_is_a_typed_rejection(series_dir: Path, tmp_path: Path) -> None:
    folder, files = copy_series(series_dir, tmp_path / "s")
    data = bytearray(files[0].read_bytes())
    at = data.find(b"CS", 200)  # the first explicit-VR CS element after the File Meta
    data[at : at + 2] = b"ZZ"
    files[0].write_bytes(bytes(data))
    found = discover_dicom(folder, files=[files[0]])
    assert [p.code for p in found.rejected] == ["not_dicom"]
