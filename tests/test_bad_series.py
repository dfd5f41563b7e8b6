"""A generated corpus of broken series: each one gets the expected QC verdict and a message that names
the files and the fix. Every case starts from a good series written by medhybrid's DICOM writer and
is broken with pydicom, the way real PACS exports break."""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest

from medhybrid.io.dicom import discover_dicom, load_series
from medhybrid.io.dicom_write import derive_uid, write_dicom_series
from medhybrid.io.geometry import IngestOptions
from medhybrid.io.scan import scan_folder
from medhybrid.io.study import Verdict

N_SLICES = 8
SPACING = 2.5


def _good_series(
    folder: Path, *, series: str = "a", description: str = "good", size: tuple[int, int] = (24, 20)
) -> list[Path]:
    rng = np.random.default_rng(0)
    volume = rng.normal(40.0, 10.0, size=(*size, N_SLICES)).round()
    affine = np.diag([-0.75, -0.75, SPACING, 1.0])  # RAS affine of an axial LPS-aligned series
    affine[:3, 3] = (90.0, 80.0, -40.0)
    return write_dicom_series(
        volume,
        affine,
        folder,
        study_uid=derive_uid("study"),
        series_uid=derive_uid("series", series),
        series_description=description,
        file_prefix=f"IM{series}",
    )


def _edit(path: Path, change: Callable[[pydicom.Dataset], None]) -> None:
    ds = pydicom.dcmread(path)
    change(ds)
    ds.save_as(path)


def _z(ds: pydicom.Dataset) -> float:
    return float(ds.ImagePositionPatient[2])


def _set_z(ds: pydicom.Dataset, z: float) -> None:
    x, y, _ = (float(v) for v in ds.ImagePositionPatient)
    ds.ImagePositionPatient = [x, y, round(z, 4)]


def case_good(files: list[Path]) -> None:
    pass


def case_dropped_slice(files: list[Path]) -> None:
    files[3].unlink()


def case_duplicated_position(files: list[Path]) -> None:
    copy = files[0].with_name("copy_of_first.dcm")
    shutil.copy(files[0], copy)
    _edit(copy, lambda ds: setattr(ds, "SOPInstanceUID", derive_uid("dup")))


def case_jittered_spacing(files: list[Path]) -> None:
    for i, f in enumerate(files[1:-1], start=1):
        _edit(f, lambda ds, i=i: _set_z(ds, _z(ds) + (0.6 if i % 2 else -0.55)))


def case_slight_jitter(files: list[Path]) -> None:
    _edit(files[4], lambda ds: _set_z(ds, _z(ds) + 0.01))  # 0.4 % of 2.5 mm: accepted with a warning


def case_mixed_orientation(files: list[Path]) -> None:
    _edit(files[5], lambda ds: setattr(ds, "ImageOrientationPatient", [1, 0, 0, 0, 0, -1]))


def case_missing_ipp(files: list[Path]) -> None:
    _edit(files[2], lambda ds: delattr(ds, "ImagePositionPatient"))


def case_tilt(files: list[Path]) -> None:
    shift = math.tan(math.radians(15.0)) * SPACING  # each slice moves along y as the table advances
    for i, f in enumerate(files):

        def tilt(ds: pydicom.Dataset, i: int = i) -> None:
            x, y, z = (float(v) for v in ds.ImagePositionPatient)
            ds.ImagePositionPatient = [x, round(y + i * shift, 4), z]

        _edit(f, tilt)


def case_mixed_matrix(files: list[Path]) -> None:
    def shrink(ds: pydicom.Dataset) -> None:
        ds.Rows, ds.Columns = 10, 10
        ds.PixelData = np.zeros((10, 10), dtype=np.uint16).tobytes()

    _edit(files[6], shrink)


def case_truncated_file(files: list[Path]) -> None:
    data = files[2].read_bytes()
    files[2].write_bytes(data[: len(data) - 300])  # cut inside the pixel data


def case_unsupported_syntax(files: list[Path]) -> None:
    # MPEG-2 video: a syntax pydicom knows but no installed plugin decodes. The pixel bytes are wrapped
    # as one encapsulated fragment so the file itself is well-formed.
    for f in files:
        ds = pydicom.dcmread(f)
        ds.PixelData = pydicom.encaps.encapsulate([ds.PixelData])
        ds["PixelData"].VR = "OB"
        ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"
        ds.save_as(f)


def case_junk(files: list[Path]) -> None:
    folder = files[0].parent
    (folder / "README.txt").write_text("exported by PACS")
    (folder / ".DS_Store").write_bytes(b"\x00\x01junk")
    (folder / "thumbs").write_bytes(b"\x89PNG not really")
    (folder / "notes.dcm").write_bytes(b"this is not dicom at all" * 10)
    deep = folder / "a" / "b" / "c"
    deep.mkdir(parents=True)
    shutil.move(str(files[1]), deep / files[1].name)  # a slice at another depth still belongs


# case -> (expected verdict of the series, expected reason code, text the message must contain)
CASES: dict[str, tuple[Callable[[list[Path]], None], str, str | None, str | None]] = {
    "good": (case_good, "ok", None, None),
    "dropped_slice": (case_dropped_slice, "reject", "missing_slices", "1 slice(s) missing"),
    "duplicated_position": (case_duplicated_position, "reject", "duplicate_position", "copy_of_first.dcm"),
    "jittered_spacing": (case_jittered_spacing, "reject", "uneven_spacing", "slice spacing varies"),
    "slight_jitter": (case_slight_jitter, "warn", "spacing_jitter", "jitters"),
    "mixed_orientation": (case_mixed_orientation, "reject", "mixed_orientation", "2 different orientations"),
    "missing_ipp": (case_missing_ipp, "reject", "missing_position", "lack ImagePositionPatient"),
    "tilt": (case_tilt, "reject", "gantry_tilt", "15.00 degrees"),
    "mixed_matrix": (case_mixed_matrix, "reject", "mixed_matrix", "10x10x1 (1 slices)"),
    "truncated_file": (case_truncated_file, "reject", None, None),
    "unsupported_syntax": (case_unsupported_syntax, "reject", "unsupported_syntax", None),
    "junk": (case_junk, "ok", None, None),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_series_corpus(tmp_path: Path, name: str) -> None:
    breaker, verdict, code, text = CASES[name]
    folder = tmp_path / name
    files = _good_series(folder)
    breaker(files)
    report = scan_folder(folder)
    series = [s for group in report.studies.values() for s in group]
    if name == "unsupported_syntax":  # every file is refused at the header, so no series forms
        assert series == []
        assert {p.code for p in report.rejected} == {"unsupported_syntax"}
        assert "no installed decoder" in report.rejected[0].reason
        assert "MPEG2" in report.rejected[0].reason
        return
    assert len(series) == 1, series
    (s,) = series
    assert s["qc"]["verdict"] == verdict, s["qc"]
    codes = [r["code"] for r in s["qc"]["reasons"]]
    if code is not None:
        assert code in codes, codes
    messages = " ".join(r["message"] for r in s["qc"]["reasons"])
    if text is not None:
        assert text in messages, messages
    if verdict == "reject":  # the message names the guilty file(s) and says how to fix it
        assert "fix:" in messages and ".dcm" in messages, messages
    if name == "truncated_file":
        assert [p.path.name for p in report.rejected] == [files[2].name]
        assert report.rejected[0].code in {"corrupt_pixel_data", "truncated_file"}
    if name == "junk":
        skipped = {p.path.name for p in report.skipped}
        assert {"README.txt", "thumbs"} <= skipped
        assert ".DS_Store" not in skipped  # hidden files are not even looked at
        assert [p.path.name for p in report.rejected] == ["notes.dcm"]
        assert s["n_slices"] == N_SLICES


def test_interleaved_series_are_separated(tmp_path: Path) -> None:
    folder = tmp_path / "mixed"
    a = _good_series(folder, series="a", description="first")
    b = _good_series(folder, series="b", description="second")
    assert len({f.parent for f in a + b}) == 1  # one folder, file names interleave
    found = discover_dicom(folder)
    assert sorted(s.description for s in found.series) == ["first", "second"]
    for s in found.series:
        assert s.qc.verdict is Verdict.OK and s.n_slices == N_SLICES
        assert len(set(s.files) & set(a)) in (0, N_SLICES)


def test_spacing_tolerance_is_configurable(tmp_path: Path) -> None:
    files = _good_series(tmp_path / "s")
    case_jittered_spacing(files)
    strict = discover_dicom(tmp_path / "s").series[0]
    assert strict.qc.verdict is Verdict.REJECT
    loose = discover_dicom(tmp_path / "s", IngestOptions(spacing_tolerance=0.6)).series[0]
    assert loose.qc.verdict is Verdict.WARN
    study = load_series(loose)
    assert study.spatial_shape == (24, 20, N_SLICES)


def test_good_series_volume_matches_what_was_written(tmp_path: Path) -> None:
    files = _good_series(tmp_path / "s")
    ds = pydicom.dcmread(files[0])
    study = load_series(discover_dicom(tmp_path / "s").series[0])
    assert study.spacing == pytest.approx((0.75, 0.75, SPACING))
    assert study.modality == "CT"
    assert "PatientName" not in study.metadata and "PatientID" not in study.metadata
    first = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    k = int(np.argmin([abs(study.affine[2, 3] + study.affine[2, 2] * k - _z(ds)) for k in range(N_SLICES)]))
    assert np.array_equal(study.array[:, :, k], first.T)


def test_native_fast_path_equals_pydicom(tmp_path: Path) -> None:
    """The zero-copy path for uncompressed pixels gives exactly pydicom's pixel_array."""
    from medhybrid.io.dicom_pixels import _native_frames, decode_frames

    files = _good_series(tmp_path / "s")
    for f in files[:3]:
        ds = pydicom.dcmread(f)
        fast = _native_frames(ds)
        assert fast is not None
        assert np.array_equal(fast[0], ds.pixel_array)
        assert np.array_equal(decode_frames(ds, f)[0], ds.pixel_array)


def test_files_without_preamble_load(tmp_path: Path) -> None:
    """Raw data sets (no 128-byte preamble, no File Meta) are found, parsed in forced mode, and load."""
    files = _good_series(tmp_path / "s")
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    for f in files:
        ds = pydicom.dcmread(f)
        buffer = DicomBytesIO()
        buffer.is_little_endian, buffer.is_implicit_VR = True, False
        write_dataset(buffer, ds)  # the bare data set: no preamble, no File Meta
        f.write_bytes(buffer.getvalue())
        assert f.read_bytes()[128:132] != b"DICM"
    (series,) = discover_dicom(tmp_path / "s").series
    study = load_series(series)
    assert study.spatial_shape == (24, 20, N_SLICES)
    assert "no_file_meta" in [r.code for r in series.qc.reasons]


@pytest.mark.parametrize(
    "syntax",
    [
        "1.2.840.10008.1.2.5",  # RLE Lossless
        "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
        "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless
    ],
)
def test_compressed_series_load_like_uncompressed(tmp_path: Path, syntax: str) -> None:
    """A whole series re-encoded with pydicom's encoders (pylibjpeg / pyjpegls plugins) loads
    voxel-for-voxel like the uncompressed original."""
    files = _good_series(tmp_path / "plain", size=(64, 64))  # OpenJPEG needs >= 32 px for its default levels
    reference = load_series(discover_dicom(tmp_path / "plain").series[0])
    packed = tmp_path / "packed"
    packed.mkdir()
    for f in files:
        ds = pydicom.dcmread(f)
        ds.compress(syntax)
        ds.save_as(packed / f.name)
    (series,) = discover_dicom(packed).series
    assert series.headers[0].transfer_syntax == syntax
    study = load_series(series)
    assert np.array_equal(study.array, reference.array)
    assert np.allclose(study.affine, reference.affine)
