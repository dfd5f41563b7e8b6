"""NIfTI / NRRD / MHA / PNG / MedMNIST readers keep geometry, and agree with nibabel and SimpleITK."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image

from medhybrid.errors import ImageReadError, InputError, UnsupportedFormatError
from medhybrid.io.readers import medmnist_study, read_geometry, read_image, read_medmnist
from medhybrid.io.study import LPS_TO_RAS, Study, study_key
from medhybrid.io.writers import save_nifti
from tests.conftest import shared_data_dir


def _rotation(ax: float, ay: float) -> np.ndarray:
    cx, sx, cy, sy = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay)
    return np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]]) @ np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])


OBLIQUE = np.eye(4)
OBLIQUE[:3, :3] = _rotation(0.3, -0.2) @ np.diag([0.8, 0.9, 2.5])  # oblique, orthogonal, anisotropic
OBLIQUE[:3, 3] = (12.0, -30.5, 7.25)


def _volume() -> np.ndarray:
    return np.arange(5 * 6 * 7, dtype=np.float32).reshape(5, 6, 7) - 100


def _sitk_affine(img: sitk.Image) -> np.ndarray:
    affine = np.eye(4)
    affine[:3, :3] = np.array(img.GetDirection()).reshape(3, 3) * np.array(img.GetSpacing())
    affine[:3, 3] = img.GetOrigin()
    return LPS_TO_RAS @ affine


def test_nifti_roundtrip_keeps_affine_and_values(tmp_path: Path) -> None:
    path = save_nifti(_volume(), OBLIQUE, tmp_path / "v.nii.gz")
    study = read_image(path)
    assert np.array_equal(study.array, _volume())
    assert np.allclose(study.affine, OBLIQUE, atol=1e-5)
    assert study.source_format == "nifti" and study.key == study_key(str(path.resolve()))
    assert read_geometry(path)[0] == (5, 6, 7)
    assert np.allclose(read_geometry(path)[1], OBLIQUE, atol=1e-5)
    # SimpleITK reads the same file to the same world geometry
    assert np.allclose(_sitk_affine(sitk.ReadImage(str(path))), study.affine, atol=1e-4)


@pytest.mark.parametrize("suffix", [".nrrd", ".mha"])
def test_sitk_formats_roundtrip_in_ras(tmp_path: Path, suffix: str) -> None:
    img = sitk.GetImageFromArray(_volume().transpose(2, 1, 0))  # sitk arrays are (k, j, i)
    img.SetSpacing((0.5, 0.75, 2.0))
    img.SetOrigin((10.0, -20.0, 30.0))
    path = tmp_path / f"v{suffix}"
    sitk.WriteImage(img, str(path))
    study = read_image(path)
    assert np.array_equal(study.array, _volume())
    expected = LPS_TO_RAS @ np.array([[0.5, 0, 0, 10.0], [0, 0.75, 0, -20.0], [0, 0, 2.0, 30.0], [0, 0, 0, 1]])
    assert np.allclose(study.affine, expected)
    assert read_geometry(path)[0] == (5, 6, 7)
    assert np.allclose(read_geometry(path)[1], expected)


def test_png_is_column_major_2d(tmp_path: Path) -> None:
    pixels = np.arange(12, dtype=np.uint8).reshape(3, 4)  # 3 rows, 4 columns
    Image.fromarray(pixels).save(tmp_path / "x.png")
    study = read_image(tmp_path / "x.png")
    assert study.spatial_shape == (4, 3, 1) and study.is_2d
    assert study.array[1, 2, 0] == pixels[2, 1]


def test_bad_inputs_raise_typed_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not found"):
        read_image(tmp_path / "missing.nii.gz")
    (tmp_path / "x.xyz").write_text("?")
    with pytest.raises(UnsupportedFormatError):
        read_image(tmp_path / "x.xyz")
    (tmp_path / "broken.nii.gz").write_bytes(b"\x1f\x8b garbage")
    with pytest.raises(ImageReadError, match="broken.nii.gz"):
        read_image(tmp_path / "broken.nii.gz")
    img = nib.Nifti1Image(np.zeros((2, 2, 2), np.float32), np.eye(4))
    img.header.set_qform(None, code=0)
    img.header["srow_x"][:] = img.header["srow_y"][:] = img.header["srow_z"][:] = 0  # a sform of zeros
    img.header["sform_code"] = 1
    nib.save(nib.Nifti1Image(np.zeros((2, 2, 2), np.float32), None, img.header), tmp_path / "singular.nii")
    with pytest.raises(ImageReadError):
        read_image(tmp_path / "singular.nii")


def test_medmnist_npz(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    np.savez(
        tmp_path / "toy.npz",
        train_images=rng.integers(0, 255, (3, 28, 28), dtype=np.uint8),
        train_labels=np.array([[0], [1], [0]]),
        val_images=rng.integers(0, 255, (2, 28, 28), dtype=np.uint8),
        val_labels=np.array([[1], [0]]),
    )
    splits = read_medmnist(tmp_path / "toy.npz")
    assert set(splits) == {"train", "val"} and splits["train"][1].tolist() == [0, 1, 0]
    study = medmnist_study(splits["train"][0], 1, tmp_path / "toy.npz", "train")
    assert study.spatial_shape == (28, 28, 1)
    assert study.array[3, 5, 0] == splits["train"][0][1][5, 3]  # (row 5, col 3) -> i=3, j=5
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(ImageReadError, match="no MedMNIST arrays"):
        read_medmnist(tmp_path / "other.npz")


def test_study_refuses_phi_metadata() -> None:
    with pytest.raises(ValueError, match="PHI"):
        Study("k", np.zeros((2, 2, 2), np.float32), np.eye(4), "CT", Path("."), "dicom", {"PatientName": "X"})


NIFTI = sorted((shared_data_dir() / "nifti").rglob("*.nii*")) if (shared_data_dir() / "nifti").is_dir() else []


@pytest.mark.skipif(not NIFTI, reason="shared NIfTI samples not found (../shared/data/nifti)")
@pytest.mark.parametrize("path", NIFTI, ids=[p.name for p in NIFTI])
def test_shared_nifti_matches_nibabel(path: Path) -> None:
    study = read_image(path)
    img = nib.load(str(path))
    assert np.allclose(study.affine, img.affine)
    assert study.array.shape[:3] == img.shape[:3]
    assert np.allclose(study.array.reshape(img.shape), img.get_fdata(dtype=np.float32))


def test_png_modes_keep_stored_values(tmp_path: Path) -> None:
    labels = np.array([[0, 1, 2], [2, 1, 0]], dtype=np.uint8)
    palette = Image.fromarray(labels, mode="L").convert("P")
    palette.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * (256 * 3 - 9))
    palette.save(tmp_path / "mask.png")
    assert set(np.unique(read_image(tmp_path / "mask.png").array)) == {0, 1, 2}  # indices, not grey levels
    Image.fromarray(labels.astype(bool)).save(tmp_path / "bits.png")
    assert set(np.unique(read_image(tmp_path / "bits.png").array)) == {0, 1}
    rgb = np.zeros((2, 3, 3), np.uint8)
    rgb[1, 2] = (10, 20, 30)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    study = read_image(tmp_path / "rgb.png")
    assert study.shape == (3, 2, 1, 3) and study.array[2, 1, 0].tolist() == [10, 20, 30]


def test_4d_mha_keeps_spatial_affine(tmp_path: Path) -> None:
    img = sitk.JoinSeries([sitk.GetImageFromArray(_volume().transpose(2, 1, 0))] * 2)  # 4D: (x, y, z, t)
    img.SetSpacing((0.5, 0.75, 2.0, 1.0))
    img.SetOrigin((10.0, -20.0, 30.0, 0.0))
    sitk.WriteImage(img, str(tmp_path / "v4.mha"))
    expected = LPS_TO_RAS @ np.array([[0.5, 0, 0, 10.0], [0, 0.75, 0, -20.0], [0, 0, 2.0, 30.0], [0, 0, 0, 1]])
    assert np.allclose(read_geometry(tmp_path / "v4.mha")[1], expected)
