"""MedMNIST and MSD importers: exact round trip through read_image, every split, determinism, MSD splits.

The last tests run on the real ../shared/data (skipped with a reason when it is absent).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from medhybrid.data.importers import import_medmnist, import_msd, medmnist_name
from medhybrid.errors import ConfigError, ImageReadError, InputError
from medhybrid.io.manifest import read_manifest
from medhybrid.io.manifest_validate import validate_manifest
from medhybrid.io.readers import medmnist_study, read_image, read_medmnist

SPLITS = {"train": 5, "val": 3, "test": 2}


def fake_medmnist(path: Path, sample_shape: tuple[int, ...], n_classes: int = 2) -> Path:
    """A MedMNIST-like npz with train/val/test, non-square samples (transposes show) and (N, 1) labels."""
    rng = np.random.default_rng(7)
    arrays = {}
    for split, n in SPLITS.items():
        arrays[f"{split}_images"] = rng.integers(0, 256, size=(n, *sample_shape), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % n_classes).astype(np.uint8).reshape(n, 1)
    np.savez_compressed(path, **arrays)
    return path


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize(("shape", "suffix"), [((6, 7), ".png"), ((5, 6, 7), ".nii.gz")])
def test_medmnist_files_read_back_as_medmnist_study(tmp_path: Path, shape: tuple[int, ...], suffix: str) -> None:
    npz = fake_medmnist(tmp_path / "fakemnist3d_trainval.npz", shape, n_classes=3)
    calls: list[int] = []
    manifest_path = import_medmnist(npz, tmp_path / "out", progress=lambda: calls.append(1))
    assert manifest_path == tmp_path / "out" / "manifest.csv"
    assert len(calls) == sum(SPLITS.values())
    manifest = read_manifest(manifest_path)
    assert {s: len(manifest.split(s)) for s in manifest.splits()} == SPLITS
    assert manifest.label_names == {0: "class_0", 1: "class_1", 2: "class_2"}
    assert manifest.task == "classification"
    splits = read_medmnist(npz)
    for row in manifest.rows:
        name, split, index = row.study_id.rsplit("_", 2)
        assert name == "fakemnist3d" and row.mask is None
        assert row.image == tmp_path / "out" / "images" / split / f"{row.study_id}{suffix}"
        images, labels = splits[split]
        assert row.label == int(labels[int(index)])
        expected = medmnist_study(images, int(index), npz, split)
        got = read_image(row.image)
        assert got.array.shape == expected.array.shape
        np.testing.assert_array_equal(got.array, expected.array)
        # 2D (PNG) gets the geometry-less 2D affine (DICOM's default axial), 3D (NIfTI) the identity
        np.testing.assert_array_equal(got.affine, np.diag([-1.0, -1.0, 1.0, 1.0]) if suffix == ".png" else np.eye(4))
        np.testing.assert_array_equal(got.affine, expected.affine)
    report = validate_manifest(manifest_path)
    assert report.ok and report.split_counts == SPLITS


def test_medmnist_nifti_is_uint8_with_mm_units(tmp_path: Path) -> None:
    npz = fake_medmnist(tmp_path / "adrenalmnist3d_64.npz", (5, 6, 7))
    import_medmnist(npz, tmp_path / "out")
    img = nib.load(str(tmp_path / "out" / "images" / "val" / "adrenalmnist3d_64_val_00002.nii.gz"))
    assert img.get_data_dtype() == np.uint8
    assert img.header.get_xyzt_units()[0] == "mm"
    assert read_manifest(tmp_path / "out" / "manifest.csv").label_names == {0: "normal", 1: "hyperplasia"}


def test_medmnist_output_is_byte_identical(tmp_path: Path) -> None:
    for shape in [(6, 7), (5, 6, 7)]:
        (tmp_path / f"src{len(shape)}").mkdir()
        npz = fake_medmnist(tmp_path / f"src{len(shape)}" / "pneumoniamnist_trainval.npz", shape)
        first = tree_bytes(import_medmnist(npz, tmp_path / f"a{len(shape)}").parent)
        again = tree_bytes(import_medmnist(npz, tmp_path / f"b{len(shape)}").parent)
        import_medmnist(npz, tmp_path / f"a{len(shape)}")  # rewrite in place
        assert first == again == tree_bytes(tmp_path / f"a{len(shape)}")
        assert len(first) == sum(SPLITS.values()) + 2  # images + manifest.csv + manifest.json
    sidecar = json.loads((tmp_path / "a2" / "manifest.json").read_text(encoding="utf-8"))
    assert sidecar["label_names"] == {"0": "normal", "1": "pneumonia"} and sidecar["task"] == "classification"


def test_medmnist_rgb_png_holds_the_colour_pixels(tmp_path: Path) -> None:
    npz = fake_medmnist(tmp_path / "colourmnist.npz", (6, 7, 3))
    manifest = read_manifest(import_medmnist(npz, tmp_path / "out"))
    images, _ = read_medmnist(npz)["test"]
    row = manifest.split("test")[1]
    with Image.open(row.image) as im:
        assert im.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(im), images[1])
    # medmnist_study keeps (I, J, 1, 3); the PNG holds the same pixels in PIL's (rows, cols, 3) order
    np.testing.assert_array_equal(
        np.transpose(np.asarray(Image.open(row.image)), (1, 0, 2))[:, :, None, :],
        medmnist_study(images, 1, npz, "test").array,
    )


def test_medmnist_name_and_bad_archive(tmp_path: Path) -> None:
    assert medmnist_name(Path("x/adrenalmnist3d_64_trainval.npz")) == "adrenalmnist3d_64"
    assert medmnist_name(Path("pneumoniamnist.npz")) == "pneumoniamnist"
    bad = tmp_path / "bad.npz"
    np.savez(bad, something=np.zeros(3))
    with pytest.raises(ImageReadError):
        import_medmnist(bad, tmp_path / "out")
    floats = tmp_path / "floats.npz"
    np.savez(floats, train_images=np.zeros((2, 4, 4), dtype=np.float32), train_labels=np.zeros((2, 1)))
    with pytest.raises(ImageReadError, match="uint8"):
        import_medmnist(floats, tmp_path / "out")


# --- MSD ------------------------------------------------------------------------------------------


def fake_msd(root: Path, n: int = 10, missing: tuple[int, ...] = ()) -> Path:
    """An MSD-like task folder with n cases; the image of each case in ``missing`` is not written."""
    training = []
    for i in range(1, n + 1):
        case = f"organ_{i:03d}.nii.gz"
        affine = np.diag([1.0, 1.0, 1.0, 1.0])
        affine[:3, 3] = [i, -i, 0.5]
        (root / "imagesTr").mkdir(parents=True, exist_ok=True)
        (root / "labelsTr").mkdir(parents=True, exist_ok=True)
        if i not in missing:
            nib.save(nib.Nifti1Image(np.zeros((3, 4, 5), np.float32), affine), str(root / "imagesTr" / case))
        labels = np.zeros((3, 4, 5), np.uint8)
        labels[1, 1, 1:3] = [1, 2]
        nib.save(nib.Nifti1Image(labels, affine), str(root / "labelsTr" / case))
        training.append({"image": f"./imagesTr/{case}", "label": f"./labelsTr/{case}"})
    meta = {"name": "Organ", "labels": {"0": "background", "1": "head", "2": "tail"}, "training": training}
    (root / "dataset.json").write_text(json.dumps(meta), encoding="utf-8")
    return root


def test_msd_manifest_points_at_originals_with_deterministic_disjoint_split(tmp_path: Path) -> None:
    msd = fake_msd(tmp_path / "Task99_Organ")
    path = import_msd(msd, tmp_path / "out")
    manifest = read_manifest(path)
    assert manifest.task == "segmentation"
    assert manifest.mask_label_names == {0: "background", 1: "head", 2: "tail"}
    assert len(manifest.rows) == 10
    val = {r.study_id for r in manifest.split("val")}
    train = {r.study_id for r in manifest.split("train")}
    assert len(val) == 2 and len(train) == 8 and not val & train
    row = next(r for r in manifest.rows if r.study_id == "organ_004")
    assert row.image == msd / "imagesTr" / "organ_004.nii.gz"
    assert row.mask == msd / "labelsTr" / "organ_004.nii.gz"
    assert row.label is None
    assert "../Task99_Organ/imagesTr/organ_001.nii.gz" in path.read_text(encoding="utf-8")
    report = validate_manifest(path)
    assert report.ok and report.warnings == []
    # deterministic: same seed, same bytes; the split depends on the seed and on val_fraction only
    first = path.read_bytes()
    assert import_msd(msd, tmp_path / "again").read_bytes() == first
    other = {r.study_id for r in read_manifest(import_msd(msd, tmp_path / "s1", seed=1)).split("val")}
    seeds = [other] + [
        {r.study_id for r in read_manifest(import_msd(msd, tmp_path / f"s{s}", seed=s)).split("val")} for s in (2, 3)
    ]
    assert any(v != val for v in seeds)
    half = read_manifest(import_msd(msd, tmp_path / "half", val_fraction=0.5))
    assert len(half.split("val")) == 5


def test_msd_skips_cases_with_missing_files(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    msd = fake_msd(tmp_path / "task", n=6, missing=(3,))
    with caplog.at_level(logging.WARNING, logger="medhybrid.data.importers"):
        manifest = read_manifest(import_msd(msd, tmp_path / "out", val_fraction=0.0))
    assert [r.study_id for r in manifest.rows] == [f"organ_{i:03d}" for i in (1, 2, 4, 5, 6)]
    assert manifest.splits() == ["train"]
    assert "organ_003.nii.gz is missing" in caplog.text


def test_msd_bad_inputs(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="dataset.json"):
        import_msd(tmp_path, tmp_path / "out")
    (tmp_path / "dataset.json").write_text("{broken", encoding="utf-8")
    with pytest.raises(InputError, match="JSON"):
        import_msd(tmp_path, tmp_path / "out")
    (tmp_path / "dataset.json").write_text('{"name": "x"}', encoding="utf-8")
    with pytest.raises(InputError, match="training"):
        import_msd(tmp_path, tmp_path / "out")
    with pytest.raises(ConfigError):
        import_msd(fake_msd(tmp_path / "ok", n=2), tmp_path / "out", val_fraction=1.5)


# --- real shared data -----------------------------------------------------------------------------


def _shared(shared_data: Path, sub: str) -> Path:
    path = shared_data / sub
    if not path.exists():
        pytest.skip(f"{path} not found in the shared data")
    return path


def test_real_msd_hippocampus_imports_and_validates(shared_data: Path, tmp_path: Path) -> None:
    msd = _shared(shared_data, "msd_hippocampus")
    path = import_msd(msd, tmp_path / "hippo")
    report = validate_manifest(path)
    assert report.errors == [] and report.warnings == []
    assert report.rows == 208
    assert report.split_counts == {"train": 166, "val": 42}
    assert read_manifest(path).mask_label_names == {0: "background", 1: "Anterior", 2: "Posterior"}


def test_real_adrenalmnist3d_imports_and_validates(shared_data: Path, tmp_path: Path) -> None:
    npz = _shared(shared_data, "medmnist/adrenalmnist3d_trainval.npz")
    path = import_medmnist(npz, tmp_path / "adrenal")
    report = validate_manifest(path)
    assert report.errors == [] and report.warnings == []
    assert report.split_counts == {"train": 1188, "val": 98}
    assert report.label_counts == {"train": {0: 929, 1: 259}, "val": {0: 76, 1: 22}}
    images, _ = read_medmnist(npz)["val"]
    row = read_manifest(path).split("val")[97]
    np.testing.assert_array_equal(read_image(row.image).array, medmnist_study(images, 97, npz, "val").array)


@pytest.mark.slow
def test_real_pneumoniamnist_imports_and_validates(shared_data: Path, tmp_path: Path) -> None:
    npz = _shared(shared_data, "medmnist/pneumoniamnist_trainval.npz")
    report = validate_manifest(import_medmnist(npz, tmp_path / "pneumonia"))
    assert report.errors == [] and report.warnings == []
    assert report.label_counts == {"train": {0: 1214, 1: 3494}, "val": {0: 135, 1: 389}}


def test_relative_output_folder_gives_paths_relative_to_the_manifest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    npz = fake_medmnist(tmp_path / "toy.npz", (6, 7))
    monkeypatch.chdir(tmp_path)
    manifest = import_medmnist(Path("toy.npz"), Path("nested") / "out")
    first_image = manifest.read_text(encoding="utf-8").splitlines()[1].split(",")[1]
    assert first_image.startswith("images/")
    assert validate_manifest(manifest).ok
    assert npz.exists()
