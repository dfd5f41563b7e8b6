"""Image headers are checked before any voxel is allocated: declared size against the file and the memory
ceiling, .mhd / .nhdr data files confined to the header's folder, and typed errors for every bad header."""

from __future__ import annotations

import gzip
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from medhybrid.errors import ConfigError, ImageReadError
from medhybrid.io.readers import MAX_IMAGE_BYTES_ENV, load_nifti, read_geometry, read_image

REPO = Path(__file__).resolve().parents[1]
HUGE = "header declares 1,073,741,824 voxels \\(4.29 GB\\) but "  # 1024^3 float32


def _volume() -> np.ndarray:
    return np.arange(5 * 6 * 7, dtype=np.float32).reshape(5, 6, 7) - 100


def _write_nifti(path: Path, array: np.ndarray) -> Path:
    """``.nii`` via nibabel; ``.nii.gz`` as the gzip of that file."""
    plain = path.with_name(path.name.removesuffix(".gz"))
    nib.save(nib.Nifti1Image(array, np.eye(4)), plain)
    if path.name.endswith(".gz"):
        path.write_bytes(gzip.compress(plain.read_bytes(), compresslevel=9))
        plain.unlink()
    return path


def _write_sitk(path: Path, array: np.ndarray, compress: bool = False) -> Path:
    sitk.WriteImage(sitk.GetImageFromArray(array.transpose(2, 1, 0)), str(path), useCompression=compress)
    return path


def _huge_nifti(path: Path) -> Path:
    """A small NIfTI whose header is patched to claim 1024^3 float32 voxels."""
    plain = path.with_name(path.name.removesuffix(".gz"))
    _write_nifti(plain, np.zeros((2, 2, 2), np.float32))
    data = plain.read_bytes()
    header = nib.Nifti1Header.from_fileobj(io.BytesIO(data))
    header.set_data_shape((1024, 1024, 1024))
    data = header.binaryblock + data[len(header.binaryblock) :]
    plain.unlink()
    path.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)
    return path


def _huge_sitk(path: Path, compress: bool = False) -> Path:
    """A small NRRD / MetaImage written by SimpleITK, its header text edited to claim 1024^3 voxels."""
    _write_sitk(path, np.zeros((4, 4, 4), np.float32), compress)
    data = path.read_bytes()
    path.write_bytes(re.sub(rb"(DimSize = |sizes: )4 4 4", rb"\g<1>1024 1024 1024", data, count=1))
    return path


HUGE_CASES = {  # name: (file, writer, expected message)
    "nii": ("h.nii", _huge_nifti, HUGE + "the file holds only 32 bytes; the file is truncated or its header is wrong"),
    "nii.gz": ("h.nii.gz", _huge_nifti, HUGE + "the file holds only .* compressed bytes, more than gzip can compress"),
    "nrrd": ("h.nrrd", _huge_sitk, HUGE + "the file holds only 256 bytes; the file is truncated"),
    "nrrd-gzip": ("h.nrrd", lambda p: _huge_sitk(p, True), HUGE + "the file holds only .* compressed bytes"),
    "nhdr": ("h.nhdr", _huge_sitk, HUGE + "its data file holds only 256 bytes; the file is truncated"),
    "mha": ("h.mha", _huge_sitk, HUGE + "the file holds only 256 bytes; the file is truncated"),
    "mha-compressed": ("h.mha", lambda p: _huge_sitk(p, True), HUGE + "the file holds only .* compressed bytes"),
    "mhd": ("h.mhd", _huge_sitk, HUGE + "its data file holds only 256 bytes; the file is truncated"),
}

# Reads each file in a fresh process and reports the error and the growth of peak memory. Address space is
# capped at 1.5 GiB above the imported state, so a reader that allocates the declared 4 GB fails fast (and
# with another message) instead of taking the machine's memory.
_PROBE = """
import json, resource, sys, time
from pathlib import Path
from medhybrid.io.readers import read_image
if sys.platform.startswith("linux"):
    vm = int(open("/proc/self/statm").read().split()[0]) * resource.getpagesize()
    resource.setrlimit(resource.RLIMIT_AS, (vm + 3 * 2**29, resource.getrlimit(resource.RLIMIT_AS)[1]))
unit = 1 if sys.platform == "darwin" else 1024
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * unit
out = {}
for name in sys.argv[1:]:
    start = time.perf_counter()
    try:
        read_image(Path(name))
        err = {"type": "none", "message": "loaded", "fix": None}
    except Exception as exc:
        err = {"type": type(exc).__name__, "message": str(exc), "fix": getattr(exc, "fix", None)}
    growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * unit - base
    out[name] = {**err, "seconds": time.perf_counter() - start, "growth_mb": growth / 2**20}
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def huge_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("huge")
    files = {}
    for case, (name, write, _) in HUGE_CASES.items():
        (root / case).mkdir()
        files[case] = write(root / case / name)
    return files


@pytest.fixture(scope="module")
def probed(huge_files: dict[str, Path]) -> dict[str, dict]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, *map(str, huge_files.values())],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", HUGE_CASES)
def test_huge_header_in_tiny_file_fails_fast_without_allocating(
    case: str, huge_files: dict[str, Path], probed: dict[str, dict]
) -> None:
    got = probed[str(huge_files[case])]
    assert got["type"] == "ImageReadError", got
    assert re.search(HUGE_CASES[case][2], got["message"]), got["message"]
    assert got["message"].startswith(str(huge_files[case]))  # names the file
    assert got["fix"] and "\n" not in got["fix"]
    assert got["growth_mb"] < 500, got
    assert got["seconds"] < 10, got


@pytest.mark.parametrize("case", HUGE_CASES)
def test_read_geometry_refuses_the_same_headers(case: str, huge_files: dict[str, Path]) -> None:
    # read_geometry allocates nothing, but a file it accepts must be one read_image reads
    with pytest.raises(ImageReadError, match=HUGE_CASES[case][2]) as err:
        read_geometry(huge_files[case])
    assert err.value.path == huge_files[case]


def test_ceiling_applies_to_the_in_memory_size(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    nii = _write_nifti(tmp_path / "v.nii.gz", _volume())  # 210 voxels: 840 bytes as float32, 1680 as float64
    mha = _write_sitk(tmp_path / "v.mha", _volume(), compress=True)
    monkeypatch.setenv(MAX_IMAGE_BYTES_ENV, "1000")
    for path in (nii, mha):
        assert np.array_equal(read_image(path).array, _volume())
        with pytest.raises(
            ImageReadError, match="210 voxels .*, 1,680 bytes in memory, above the limit of 1,000 bytes"
        ) as err:
            read_image(path, dtype=np.float64)
        assert MAX_IMAGE_BYTES_ENV in (err.value.fix or "")
    monkeypatch.setenv(MAX_IMAGE_BYTES_ENV, "800")
    with pytest.raises(ImageReadError, match="above the"):
        read_geometry(nii)
    monkeypatch.setenv(MAX_IMAGE_BYTES_ENV, "lots")
    with pytest.raises(ConfigError, match=MAX_IMAGE_BYTES_ENV):
        read_image(nii)


def test_blank_mask_at_the_deflate_limit_still_reads(tmp_path: Path) -> None:
    # zeros gzip at ~1029:1: a "1000x the file size" rule would refuse this real, empty mask
    path = _write_nifti(tmp_path / "blank.nii.gz", np.zeros((256, 256, 128), np.uint8))
    assert (256 * 256 * 128) / path.stat().st_size > 1000
    assert not read_image(path, dtype=np.int16).array.any()


# --- data files outside the header's folder --------------------------------------------------------


def _detached(folder: Path, name: str) -> tuple[Path, Path]:
    """A .mhd or .nhdr + raw pair written by SimpleITK into ``folder``: (header, data file)."""
    folder.mkdir(parents=True, exist_ok=True)
    header = _write_sitk(folder / name, _volume())
    text = header.read_text()
    data = re.search(r"(?:ElementDataFile = |data file: )(.+)", text)
    assert data is not None
    return header, folder / data.group(1).strip()


def _point_at(header: Path, target: str) -> None:
    text = re.sub(r"(ElementDataFile = |data file: ).+", lambda m: m.group(1) + target, header.read_text())
    header.write_text(text)


def test_mhd_with_absolute_data_file_elsewhere_is_refused_unless_allowed(tmp_path: Path) -> None:
    _, raw = _detached(tmp_path / "elsewhere", "x.mhd")
    header, _ = _detached(tmp_path / "study", "img.mhd")
    _point_at(header, str(raw))
    for read in (read_image, read_geometry):
        with pytest.raises(ImageReadError, match="outside the header's folder") as err:
            read(header)
        assert err.value.path == header and str(raw) in err.value.message
        assert "allow_external_data=True" in (err.value.fix or "")
    assert np.array_equal(read_image(header, allow_external_data=True).array, _volume())
    assert read_geometry(header, allow_external_data=True)[0] == (5, 6, 7)


def test_nhdr_with_relative_data_file_escaping_its_folder_is_refused(tmp_path: Path) -> None:
    _detached(tmp_path / "other", "x.nhdr")
    header, _ = _detached(tmp_path / "study", "img.nhdr")
    _point_at(header, "../other/x.raw")
    with pytest.raises(ImageReadError, match="'../other/x.raw', which resolves to .*other.x.raw, outside"):
        read_image(header)
    assert np.array_equal(read_image(header, allow_external_data=True).array, _volume())


@pytest.mark.parametrize(
    ("name", "field"),
    [
        ("img.mhd", "/etc/passwd"),
        ("img.nhdr", "LIST\ninside.raw\n../../secret"),
        ("img.mhd", "LIST\ninside.raw\n/etc/passwd"),
        ("img.nhdr", "../slice%d.raw 0 6 1"),
        ("img.mhd", "sub/../../slice%d.raw 0 6 1"),
    ],
    ids=["absolute", "nrrd-list", "meta-list", "nrrd-pattern", "meta-pattern"],
)
def test_every_data_file_form_is_confined(tmp_path: Path, name: str, field: str) -> None:
    header, _ = _detached(tmp_path / "study", name)
    _point_at(header, field)
    with pytest.raises(ImageReadError, match="outside the header's folder"):
        read_image(header)


def test_symlinked_data_file_pointing_outside_is_refused(tmp_path: Path) -> None:
    _, raw = _detached(tmp_path / "elsewhere", "x.mhd")
    header, inside = _detached(tmp_path / "study", "img.mhd")
    inside.unlink()
    try:
        inside.symlink_to(raw)
    except OSError:
        pytest.skip("no symlinks here")
    with pytest.raises(ImageReadError, match="outside the header's folder"):
        read_image(header)


@pytest.mark.parametrize("suffix", [".nhdr", ".mhd"])
@pytest.mark.parametrize("form", ["pattern", "list", "subfolder"])
def test_data_files_inside_the_folder_read(tmp_path: Path, suffix: str, form: str) -> None:
    vol = _volume()
    (tmp_path / "slices").mkdir()
    for k in range(7):
        vol[:, :, k].T.astype("<f4").tofile(tmp_path / "slices" / f"s{k}.raw")  # (j, i) per slice, i fastest
    names = {
        "pattern": "slices/s%d.raw 0 6 1",
        "list": "LIST\n" + "\n".join(f"slices/s{k}.raw" for k in range(7)),
        "subfolder": "slices/all.raw",
    }
    vol.transpose(2, 1, 0).astype("<f4").tofile(tmp_path / "slices" / "all.raw")
    if suffix == ".nhdr":
        text = "NRRD0004\ntype: float\ndimension: 3\nsizes: 5 6 7\nendian: little\nencoding: raw\ndata file: "
    else:
        text = "ObjectType = Image\nNDims = 3\nDimSize = 5 6 7\nElementType = MET_FLOAT\nElementDataFile = "
    header = tmp_path / f"img{suffix}"
    header.write_text(text + names[form] + "\n")
    assert np.array_equal(read_image(header).array, vol)


# --- every bad header is a typed error --------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "edit", "message"),
    [
        ("x.nhdr", ("data file: x.raw", "data file: s%d.raw 0 many 1"), "cannot expand the data file pattern"),
        ("x.nhdr", ("data file: x.raw", "data file: s%d.raw 0 1000000000 1"), "1,000,000,001 files"),
        ("x.nhdr", ("data file: x.raw", "data file: s%d.raw 0 6 0"), "cannot expand"),
        ("x.nhdr", ("encoding: raw", "encoding: raw\nbyte skip: lots"), "byteskip is not a whole number"),
        ("x.nhdr", ("data file: x.raw", "data file: gone.raw"), "'gone.raw' named by the header is missing"),
        ("x.mhd", ("ElementDataFile = x.raw", "ElementDataFile = gone.raw"), "missing"),
        ("x.mhd", ("ElementDataFile = x.raw", "HeaderSize = 1000\nElementDataFile = x.raw"), "holds only 0 bytes"),
        (
            "x.mha",
            ("DimSize = 5 6 7", "DimSize = 50 6 7"),
            "2,100 voxels \\(8,400 bytes\\) but the file holds only 840 bytes",
        ),
        ("x.mha", ("ElementDataFile = LOCAL", "Nothing"), "no ElementDataFile"),
        ("x.nrrd", ("NRRD0004", "NOPE"), "not a NRRD file"),
    ],
)
def test_bad_headers_raise_image_read_error(tmp_path: Path, name: str, edit: tuple[str, str], message: str) -> None:
    path = _write_sitk(tmp_path / name, _volume())
    header = path.read_bytes()
    assert edit[0].encode() in header
    path.write_bytes(header.replace(edit[0].encode(), edit[1].encode(), 1))
    for read in (read_image, read_geometry):
        with pytest.raises(ImageReadError, match=message) as err:
            read(path)
        assert err.value.path == path and err.value.fix and "\n" not in err.value.fix


def test_nifti_with_impossible_dims_is_typed(tmp_path: Path) -> None:
    path = _write_nifti(tmp_path / "x.nii", _volume())
    data = bytearray(path.read_bytes())
    data[40:42] = (9).to_bytes(2, sys.byteorder, signed=True)  # dim[0] = 9: more than NIfTI's 7 dimensions
    path.write_bytes(bytes(data))
    for read in (read_image, read_geometry):
        with pytest.raises(ImageReadError):
            read(path)


# --- normal files read exactly as before ------------------------------------------------------------


def _as_before(path: Path) -> np.ndarray:
    """The voxels as the readers produced them before the header checks (nibabel / SimpleITK directly)."""
    if path.name.endswith((".nii", ".nii.gz")):
        return np.asarray(load_nifti(path).get_fdata(dtype=np.float32))
    return np.moveaxis(sitk.GetArrayFromImage(sitk.ReadImage(str(path))), (0, 1, 2), (2, 1, 0))


@pytest.mark.parametrize(
    ("name", "compress"),
    [("v.nii", False), ("v.nii.gz", True)]
    + [(f"v{s}", c) for s in (".mha", ".nrrd", ".mhd", ".nhdr") for c in (False, True)],
)
def test_normal_files_read_identical_arrays(tmp_path: Path, name: str, compress: bool) -> None:
    if name.startswith("v.nii"):
        path = _write_nifti(tmp_path / name, _volume())
    else:
        path = _write_sitk(tmp_path / name, _volume(), compress)
    study = read_image(path)
    assert np.array_equal(study.array, _as_before(path)) and np.array_equal(study.array, _volume())
    assert read_geometry(path)[0] == (5, 6, 7)
