"""Round trips of medhybrid.io.dicom_write through the project's own DICOM reader."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pydicom
import pytest

from medhybrid.io.dicom import discover_dicom, load_series
from medhybrid.io.dicom_write import derive_uid, format_ds, plane_geometry, write_dicom_series
from medhybrid.io.study import LPS_TO_RAS, Verdict


def _rotation(axis: str, degrees: float) -> np.ndarray:
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    return {
        "x": np.array([[1, 0, 0], [0, c, -s], [0, s, c]]),
        "y": np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]]),
        "z": np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]),
    }[axis]


def _affine_from_lps(directions: np.ndarray, spacing: tuple[float, float, float], origin_lps) -> np.ndarray:
    """RAS affine whose LPS columns are row dir, column dir (``directions[:, :2]``) and their cross
    product (the reader's slice normal, so the LPS determinant is positive), times ``spacing``."""
    directions = np.array(directions, dtype=float)
    directions[:, 2] = np.cross(directions[:, 0], directions[:, 1])
    lps = np.eye(4)
    lps[:3, :3] = directions * np.asarray(spacing)
    lps[:3, 3] = origin_lps
    return LPS_TO_RAS @ lps


AXIAL = np.diag([-0.75, -0.5, 2.5, 1.0]) + np.array([[0, 0, 0, 12.25], [0, 0, 0, -30.5], [0, 0, 0, 41.0], [0] * 4])
OBLIQUE = _affine_from_lps(
    _rotation("z", 23.0) @ _rotation("x", -17.0) @ _rotation("y", 9.0), (0.8, 0.6, 1.7), (-3, 7, 11)
)
# sagittal: i runs anterior->posterior (+y LPS), j head->feet (-z), so k runs left->right (-x)
SAGITTAL = _affine_from_lps(np.array([[0, 0, 0], [1, 0, 0], [0, -1, 0]]), (1.0, 1.25, 3.0), (40, -60, 80))
# coronal: i runs right->left (+x), j head->feet (-z), so k runs anterior->posterior (+y)
CORONAL = _affine_from_lps(np.array([[1, 0, 0], [0, 0, 0], [0, -1, 0]]), (0.5, 0.5, 2.0), (-20, 5, 30))


def _write(volume: np.ndarray, affine: np.ndarray, out: Path, **kwargs) -> list[Path]:
    return write_dicom_series(
        volume,
        affine,
        out,
        study_uid=derive_uid("test", "study"),
        series_uid=derive_uid("test", "series"),
        **kwargs,
    )


def _volume(shape: tuple[int, int, int], seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.uniform(-1000.0, 2000.0, size=shape)


@pytest.mark.parametrize("affine", [AXIAL, OBLIQUE, SAGITTAL, CORONAL], ids=["axial", "oblique", "sagittal", "coronal"])
def test_round_trip(tmp_path: Path, affine: np.ndarray) -> None:
    assert np.linalg.det((LPS_TO_RAS @ affine)[:3, :3]) > 0  # column 2 along the reader's normal
    volume = _volume((7, 5, 4))
    files = _write(volume, affine, tmp_path / "s")
    assert [f.name for f in files] == ["IM0001.dcm", "IM0002.dcm", "IM0003.dcm", "IM0004.dcm"]
    discovery = discover_dicom(tmp_path / "s")
    assert not discovery.rejected and not discovery.skipped
    (series,) = discovery.series
    assert series.qc.verdict is Verdict.OK, series.qc.as_dict()
    study = load_series(series)
    assert study.array.shape == volume.shape
    np.testing.assert_array_equal(study.array, np.rint(volume).astype(np.float32))
    np.testing.assert_allclose(study.affine, affine, atol=1e-9)
    assert study.modality == "CT"


def test_pixel_layout_and_header(tmp_path: Path) -> None:
    volume = np.zeros((3, 2, 2))
    volume[2, 0, 1] = 100.0  # column 2, row 0 of slice 1
    files = _write(volume, AXIAL, tmp_path, patient_name="DOE^JANE", patient_id="X1", patient_birth_date="19500102")
    ds = pydicom.dcmread(files[1])
    assert ds.preamble == b"\0" * 128
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.2"
    assert (ds.Rows, ds.Columns) == (2, 3)
    assert ds.pixel_array[0, 2] == 1124 and ds.pixel_array.sum() == 1124 + 5 * 1024
    assert [float(v) for v in ds.PixelSpacing] == [0.5, 0.75]
    assert [float(v) for v in ds.ImagePositionPatient] == [-12.25, 30.5, 43.5]
    assert [str(ds.PatientName), ds.PatientID, ds.PatientBirthDate] == ["DOE^JANE", "X1", "19500102"]
    assert ds.StudyTime == "120000" and ds.StudyDate == "20240101"
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID", "SOPInstanceUID"):
        assert pydicom.uid.UID(ds[keyword].value).is_valid
    assert len({pydicom.dcmread(f).SOPInstanceUID for f in files}) == len(files)


def test_deterministic(tmp_path: Path) -> None:
    volume = _volume((6, 6, 3), seed=1)
    a = _write(volume, OBLIQUE, tmp_path / "a")
    b = _write(volume, OBLIQUE, tmp_path / "b")
    assert [f.read_bytes() for f in a] == [f.read_bytes() for f in b]
    assert not [p for p in (tmp_path / "a").iterdir() if p.name.startswith(".")]  # no temp files left


def test_single_slice_and_mr(tmp_path: Path) -> None:
    volume = _volume((8, 9, 1))[:, :, 0]
    _write(volume, AXIAL, tmp_path, modality="MR", rescale_intercept=0.0, rescale_slope=2.0)
    study = load_series(discover_dicom(tmp_path).series[0])
    expected = np.clip(np.rint(volume / 2.0), 0, None) * 2.0
    np.testing.assert_array_equal(study.array[:, :, 0], expected.astype(np.float32))
    np.testing.assert_allclose(study.affine, AXIAL)
    assert study.modality == "MR"


def test_reversed_k_reads_back_flipped(tmp_path: Path) -> None:
    flipped = AXIAL.copy()
    flipped[:3, 2] *= -1
    volume = _volume((4, 4, 3), seed=2)
    _write(volume, flipped, tmp_path)
    study = load_series(discover_dicom(tmp_path).series[0])
    np.testing.assert_array_equal(study.array, np.rint(volume[:, :, ::-1]).astype(np.float32))
    ijk = np.array([1, 2, 0, 1.0])
    np.testing.assert_allclose(study.affine @ ijk, flipped @ np.array([1, 2, 2, 1.0]))


def test_rejects_bad_input(tmp_path: Path) -> None:
    sheared = AXIAL.copy()
    sheared[0, 2] = 1.0
    with pytest.raises(ValueError, match="gantry tilt"):
        _write(np.zeros((2, 2, 2)), sheared, tmp_path)
    skewed = AXIAL.copy()
    skewed[1, 0] = 0.3
    with pytest.raises(ValueError, match="orthogonal"):
        _write(np.zeros((2, 2, 2)), skewed, tmp_path)
    with pytest.raises(ValueError, match="modality"):
        _write(np.zeros((2, 2, 2)), AXIAL, tmp_path, modality="US")
    with pytest.raises(ValueError, match="NaN"):
        _write(np.full((2, 2, 2), np.nan), AXIAL, tmp_path)
    with pytest.raises(ValueError, match="keyword"):
        _write(np.zeros((2, 2, 2)), AXIAL, tmp_path, extra={"NotAKeyword": 1})


def test_helpers() -> None:
    assert derive_uid("a", "b") == derive_uid("a", "b") != derive_uid("a", "c")
    assert derive_uid("a", prefix="1.2.3.").startswith("1.2.3.")
    assert format_ds(-0.0) == "0.0" and format_ds(1e-17) == "0.0" and format_ds(-23.625) == "-23.625"
    assert all(len(format_ds(v)) <= 16 for v in (1 / 3, -1e-5 / 3, 123456.789012345, math.pi * 1e9))
    geo = plane_geometry(AXIAL)
    assert geo["pixel_spacing"] == (0.5, 0.75) and geo["slice_mm"] == 2.5
