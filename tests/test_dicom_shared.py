"""Every real DICOM file and series in ../shared/data/dicom loads with SimpleITK's geometry, or fails with
the typed error it is known to deserve (``EXPECTED_FAILURES``). A good series that stops loading fails
this test, whatever the error; a new file dropped into those folders must load, or be added to the list
with its reason."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from medhybrid.errors import MedHybridError
from medhybrid.io.dicom import discover_dicom, load_series
from medhybrid.io.dicom_files import iter_files
from medhybrid.io.study import LPS_TO_RAS, Study
from tests.conftest import shared_data_dir

DICOM = shared_data_dir() / "dicom"
sitk.ProcessObject_SetGlobalWarningDisplay(False)


def _units() -> list[tuple[str, list[Path]]]:
    """Single files one by one; every folder of series/ that holds files directly as one unit."""
    if not DICOM.is_dir():
        return []
    units = [(f"single/{p.name}", [p]) for p in sorted((DICOM / "single").iterdir()) if p.is_file()]
    units += [(f"malformed/{p.name}", [p]) for p in sorted((DICOM / "malformed").iterdir()) if p.is_file()]
    for folder in sorted(p for p in (DICOM / "series").rglob("*") if p.is_dir()):
        files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
        if files:
            units.append((str(folder.relative_to(DICOM)), files))
    return units


UNITS = _units()
# unit -> the error codes its series fail with, and why that is right
EXPECTED_FAILURES: dict[str, set[str]] = {
    # Enhanced MR whose frames carry no per-frame ImagePositionPatient: not orderable in space
    "single/emri_small.dcm": {"missing_position"},
    "single/emri_small_jpeg_2k_lossless.dcm": {"missing_position"},
    # broken on purpose (pydicom's malformed test files)
    "malformed/JPEG-lossy.dcm": {"corrupt_pixel_data"},
    "malformed/JPEG2000-embedded-sequence-delimiter.dcm": {"corrupt_pixel_data"},
    # pydicom's DICOMDIR test set: downsized series with slices left out, and localizers mixed into series
    "series/pydicom_dicomdir/77654033/CT2": {"missing_slices"},
    "series/pydicom_dicomdir/98892001/CT2N": {"mixed_orientation"},
    "series/pydicom_dicomdir/98892003/MR2": {"mixed_orientation"},
    "series/pydicom_dicomdir/98892003/MR700": {"mixed_orientation"},
}
needs_data = pytest.mark.skipif(not UNITS, reason=f"shared DICOM data not found at {DICOM}")


def _sitk_geometry(files: list[Path]) -> tuple[np.ndarray, tuple[int, ...]]:
    """SimpleITK's RAS affine and (I, J, K) size for the same files."""
    if len(files) == 1:
        img = sitk.ReadImage(str(files[0]))
    else:
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames([str(f) for f in files])
        img = reader.Execute()
    affine = np.eye(4)
    affine[:3, :3] = np.array(img.GetDirection()).reshape(3, 3) * np.array(img.GetSpacing())
    affine[:3, 3] = img.GetOrigin()
    return LPS_TO_RAS @ affine, tuple(img.GetSize())


def _same_world_grid(study: Study, affine: np.ndarray, size: tuple[int, ...]) -> bool:
    """True if our voxel grid covers the same world points as SimpleITK's.

    Two conventions differ legitimately: the slice axis may run the other way (we stack along the DICOM
    normal cross(row, col); GDCM along +z), and a single slice's through-plane spacing is a convention
    (we use SliceThickness, SimpleITK 1 mm). Both are allowed; nothing else is.
    """
    if tuple(study.spatial_shape) != tuple(size[:3]):
        return False
    ours = study.affine.copy()
    theirs = affine.copy()
    if study.spatial_shape[2] == 1:
        ours[:3, 2] /= np.linalg.norm(ours[:3, 2])
        theirs[:3, 2] /= np.linalg.norm(theirs[:3, 2])
    if np.allclose(ours, theirs, atol=1e-3):
        return True
    flipped = ours.copy()  # k reversed: origin moves to the last slice, slice axis negated
    flipped[:3, 3] = ours[:3, 3] + ours[:3, 2] * (study.spatial_shape[2] - 1)
    flipped[:3, 2] = -ours[:3, 2]
    return bool(np.allclose(flipped, theirs, atol=1e-3))


@needs_data
@pytest.mark.parametrize("name,files", UNITS, ids=[u[0] for u in UNITS])
def test_every_dicom_loads_like_simpleitk_or_fails_as_expected(name: str, files: list[Path]) -> None:
    found = discover_dicom(files[0].parent, files=files)
    for problem in found.rejected + found.skipped:
        assert problem.code and problem.reason, problem  # typed, with a reason
    failures = set()
    for series in found.series:
        try:
            study = load_series(series)
        except MedHybridError as exc:
            assert exc.code in EXPECTED_FAILURES.get(name, set()), f"{name} should load: {exc}"
            assert series.qc.verdict.value == "reject" or exc.path is not None
            failures.add(exc.code)
            continue
        assert study.array.dtype == np.float32
        assert np.all(np.isfinite(study.array))
        try:
            affine, size = _sitk_geometry(series.files)
        except RuntimeError:
            continue  # SimpleITK cannot read this one; ours is the only reading
        assert _same_world_grid(study, affine, size), (name, study.affine, affine)
    assert failures == EXPECTED_FAILURES.get(name, set()), f"{name}: expected {EXPECTED_FAILURES.get(name)}"


@needs_data
def test_malformed_files_never_escape_untyped() -> None:
    """Each malformed file is either rejected/skipped with a typed reason, or (the two that pydicom reads
    and decodes correctly) loads with SimpleITK's geometry - never an uncaught exception."""
    outcomes = {}
    for path in sorted((DICOM / "malformed").iterdir()):
        found = discover_dicom(path.parent, files=[path])
        codes = [p.code for p in found.rejected + found.skipped]
        for series in found.series:
            try:
                load_series(series)
                codes.append("loaded")
            except MedHybridError as exc:
                codes.append(exc.code)
        outcomes[path.name] = codes
    # its Pixel Data ends early: rejected by the header pass (the deferred value's length against the file), so
    # it never joins a series
    assert outcomes["MR_truncated.dcm"] == ["truncated_file"]
    assert outcomes["no_meta.dcm"] == ["not_dicom"]
    assert outcomes["meta_missing_tsyntax.dcm"] == ["unsupported_syntax"]
    assert outcomes["emri_small_jpeg_2k_lossless_too_short.dcm"] == ["truncated_file"]
    assert outcomes["JPEG2000-embedded-sequence-delimiter.dcm"] == ["corrupt_pixel_data"]
    assert outcomes["JPEG-lossy.dcm"] == ["corrupt_pixel_data"]
    assert outcomes["rtstruct.dcm"] == ["not_an_image"]
    assert outcomes["rtplan_truncated.dcm"] == ["not_an_image"]
    for name, codes in outcomes.items():
        assert len(codes) == 1, (name, codes)


@needs_data
def test_real_series_geometry_is_oblique_and_regular() -> None:
    folder = DICOM / "series" / "tcia_pgbm_study3" / "11-T1post-18670"
    (series,) = discover_dicom(folder).series
    study = load_series(series)
    assert study.spatial_shape == (280, 320, 22)
    assert np.allclose(study.spacing, (0.6875, 0.6875, 6.5), atol=1e-4)
    assert series.qc.verdict.value == "ok"
    # the real pydicom CT2 series has a 200 mm gap: SimpleITK reads it with a warning, we refuse
    gap = discover_dicom(DICOM / "series" / "pydicom_dicomdir" / "77654033" / "CT2").series[0]
    assert gap.qc.verdict.value == "reject" and gap.error is not None and gap.error.code == "missing_slices"


@needs_data
def test_scan_cli_json_lists_everything_without_traceback() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "medhybrid", "data", "scan", str(DICOM), "--json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    report = json.loads(proc.stdout)
    listed = {Path(p["path"]).resolve() for p in report["rejected_files"] + report["skipped_files"]}
    for study in report["studies"]:
        for series in study["series"]:
            assert series["qc"]["verdict"] in ("ok", "warn", "reject")
            assert series["modality"] and series["shape"]
    # every file under the folder is accounted for: in a series, rejected or skipped
    in_series = discover_dicom(DICOM).series
    series_files = {f.resolve() for s in in_series for f in s.files}
    everything = {p.resolve() for p in iter_files(DICOM)}
    assert everything <= series_files | listed
    names = {Path(p["path"]).name for p in report["rejected_files"]}
    assert {"MR_truncated.dcm", "no_meta.dcm", "meta_missing_tsyntax.dcm"} <= names
    # every DICOMDIR variant (big endian, implicit, empty, ...) is skipped as an index, never "rejected"
    dicomdirs = {Path(p["path"]).name: p["code"] for p in report["skipped_files"] if "DICOMDIR" in p["path"]}
    assert len(dicomdirs) == 7 and set(dicomdirs.values()) <= {"dicomdir", "not_an_image"}
    assert not any("DICOMDIR" in name for name in names)
    assert report["counts"]["series"] == sum(len(s["series"]) for s in report["studies"])
