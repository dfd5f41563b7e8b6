"""Geometry round trips with an oracle model: "the mask lands in the right place" as an exact assertion.

The oracle returns the preprocessed ground truth as its segmentation: the native mask goes through the
checkpoint's own preprocessing (orientation, spacing, crop/pad) exactly as training prepares masks, and
the result is mapped back to the scan by the code ``infer`` and ``evaluate`` use (``Predictor.preprocess``
for the model grid, ``to_native`` for the way back). Any disagreement between the two directions (a
flipped axis, a k-reversed series, a display frame that differs between sources) shows up as a Dice
below 1. The 2D cases also check that the same pixels reach the model identically from a PNG, a DICOM
without geometry, an axial DICOM and a coronal DX.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from scipy.spatial.transform import Rotation

from medhybrid.config import DataConfig
from medhybrid.data.transforms import IMAGE, MASK, apply, build_transforms
from medhybrid.errors import PreprocessingError
from medhybrid.infer.predictor import Predictor
from medhybrid.infer.resample import argmax_labels, to_native
from medhybrid.io.dicom_write import write_dicom_series
from medhybrid.io.readers import read_image
from medhybrid.io.scan import load_study
from medhybrid.io.study import Study, display_affine
from medhybrid.io.writers import nifti_bytes
from medhybrid.models.registry import create_model
from medhybrid.train.checkpoint import save_checkpoint

LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


def checkpoint(tmp: Path, data: dict) -> Path:
    """A tiny segmentation checkpoint whose preprocessing is ``data`` (the weights do not matter)."""
    cfg = DataConfig.model_validate({"manifest": str(tmp / "m.csv"), "task": "multitask", **data})
    name = "hybrid_tiny_3d" if cfg.spatial_dims == 3 else "hybrid_tiny_2d"
    model = create_model(name, num_classes=2, seg_classes=2, img_size=list(cfg.spatial_size))
    path = tmp / "oracle.pt"
    save_checkpoint(
        path,
        {
            "model_name": name,
            "model_args": {"num_classes": 2, "seg_classes": 2, "img_size": list(cfg.spatial_size)},
            "model": model.state_dict(),
            "preprocessing": cfg.model_dump(mode="json"),
            "task": "multitask",
            "config": {"data": cfg.model_dump(mode="json")},
            "label_names": {0: "normal", 1: "abnormal"},
            "mask_label_names": {0: "background", 1: "lesion"},
            "mask_kinds": {1: "lesion"},
        },
    )
    return path


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(bool), b.astype(bool)
    return 2.0 * float((a & b).sum()) / float(a.sum() + b.sum())


def oracle_round_trip(ckpt: Path, study: Study, mask: Study) -> tuple[float, torch.Tensor]:
    """Dice of the oracle's mask mapped back to the scan against the native mask, and the model input."""
    predictor = Predictor(ckpt, device="cpu", saliency=())
    prepared = predictor.preprocess(study)  # the model grid, as infer and evaluate build it
    truth = apply(build_transforms(predictor.data_cfg, "val"), {IMAGE: study, MASK: mask})
    assert truth[IMAGE].shape == prepared.x.shape[1:]  # the oracle's grid is the model's grid
    assert torch.allclose(truth[IMAGE], prepared.x[0], atol=1e-4)
    labels = truth[MASK][0].long()
    oracle = torch.stack([(labels == 0), (labels == 1)]).float()  # one-hot "probabilities"
    back = to_native(oracle, prepared.affine, prepared.native_affine, study.spatial_shape, argmax_labels)
    native = mask.array[..., 0] if mask.array.ndim == 4 else mask.array
    return dice(back, native), prepared.x[0]


def blob(shape: tuple[int, int, int], centre: tuple[float, float, float], radii: tuple[float, ...]) -> np.ndarray:
    grids = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    inside = sum(((g - c) / r) ** 2 for g, c, r in zip(grids, centre, radii, strict=True)) <= 1.0
    return inside.astype(np.uint8)


def volume_study(tmp: Path, kind: str) -> tuple[Study, Study]:
    """(image, mask) of a 3D case, written to files and read back as infer/evaluate read them."""
    shape = (48, 40, 20)
    rng = np.random.default_rng(0)
    image = (rng.normal(0, 10, shape) + 40).astype(np.float32)
    mask = blob(shape, (20, 22, 11), (9, 8, 5))
    mask[30:40, 5:12, 2:6] = 1  # a second, asymmetric object: a flipped axis cannot pass unnoticed
    image[mask > 0] += 80
    spacing = (1.0, 1.25, 2.5) if kind != "anisotropic_ct" else (0.7, 0.7, 3.0)
    affine = np.diag([*spacing, 1.0])
    if kind == "ras_nifti":
        affine[:3, 3] = (-20, 10, 5)
    elif kind == "oblique_nifti":
        rot = Rotation.from_euler("zx", [20, 10], degrees=True).as_matrix()
        affine[:3, :3] = rot @ np.diag(spacing)
        affine[:3, 3] = (5, -8, 12)
    else:  # DICOM: an axial LPS series (i -> patient left, j -> posterior); k_reversed: feet last
        affine = LPS @ np.diag([*spacing, 1.0])
        if kind == "k_reversed_dicom":
            affine[:3, 2] *= -1
            affine[:3, 3] = affine[:3, 2] * -(shape[2] - 1)
    mask_path = tmp / "mask.nii.gz"
    mask_path.write_bytes(nifti_bytes(mask, affine))
    if kind.endswith("nifti"):
        path = tmp / "image.nii.gz"
        path.write_bytes(nifti_bytes(image, affine))
        study = load_study(path)
    else:
        write_dicom_series(image, affine, tmp / "dicom", study_uid="1.2.3", series_uid="1.2.3.4")
        study = load_study(tmp / "dicom")
    native_mask = read_image(mask_path, dtype=np.int16)
    if kind == "k_reversed_dicom":
        # the reader orders slices along the normal, so k comes back reversed; the mask NIfTI is not
        assert np.allclose(study.affine[:3, 2], -affine[:3, 2]) and study.array.shape == image.shape
        native_mask = Study("m", native_mask.array[:, :, ::-1].copy(), study.affine, "OT", mask_path, "nifti")
    return study, native_mask


VOLUME_CASES = {
    # kind: (spacing, spatial_size) of the pipeline
    "lps_dicom": ([1.0, 1.25, 2.5], [48, 40, 20]),
    "ras_nifti": ([1.0, 1.25, 2.5], [40, 32, 16]),  # also a crop
    "oblique_nifti": ([1.5, 1.5, 2.0], [48, 48, 32]),  # resampled, padded
    "k_reversed_dicom": ([1.0, 1.25, 2.5], [56, 40, 24]),  # padded
    "anisotropic_ct": ([1.4, 1.4, 1.5], [32, 32, 48]),  # thick slices to near-isotropic voxels
}


@pytest.mark.parametrize("kind", list(VOLUME_CASES))
def test_volume_round_trip(kind: str, tmp_path: Path) -> None:
    spacing, size = VOLUME_CASES[kind]
    ckpt = checkpoint(tmp_path, {"spatial_dims": 3, "spacing": spacing, "spatial_size": size, "intensity": "minmax"})
    study, mask = volume_study(tmp_path, kind)
    value, _ = oracle_round_trip(ckpt, study, mask)
    # resampling a mask to another grid and back moves its boundary by up to a voxel: exact when the grid
    # keeps the scan's spacing, close to 1 otherwise; a flip or a shift would give < 0.5
    resampled = spacing != [1.0, 1.25, 2.5]
    assert value > (0.9 if resampled else 0.999), value


# --- 2D ---------------------------------------------------------------------------------------------------

IMAGE_2D = np.zeros((40, 30), dtype=np.float32)
IMAGE_2D[5:15, 4:12] = 200.0  # top-left object (i = column, j = row)
IMAGE_2D[25:33, 18:27] = 120.0  # bottom-right object
MASK_2D = (IMAGE_2D == 200.0).astype(np.uint8)


def _dicom_2d(folder: Path, orientation: str) -> Path:
    """A one-slice DICOM of IMAGE_2D: no geometry, axial, or coronal (row to the patient's left, column
    to the feet: a PA chest radiograph as stored)."""
    if orientation == "coronal":
        affine = np.zeros((4, 4))
        affine[:3, 0] = (-0.5, 0, 0)  # RAS: toward the patient's left
        affine[:3, 1] = (0, 0, -0.5)  # toward the feet
        affine[:3, 2] = (0, 1.0, 0)
        affine[3, 3] = 1.0
    else:
        affine = LPS @ np.diag([0.5, 0.5, 1.0, 1.0])
    files = write_dicom_series(IMAGE_2D, affine, folder, study_uid="1.2.9", series_uid="1.2.9.1", rescale_intercept=0.0)
    if orientation == "none":
        ds = pydicom.dcmread(files[0])
        del ds.ImagePositionPatient, ds.ImageOrientationPatient
        ds.save_as(files[0])
    return folder


def study_2d(tmp: Path, source: str) -> tuple[Study, Study]:
    if source == "png":
        from PIL import Image

        Image.fromarray(IMAGE_2D.T.astype(np.uint8)).save(tmp / "image.png")
        Image.fromarray(MASK_2D.T).save(tmp / "mask.png")
        return load_study(tmp / "image.png"), read_image(tmp / "mask.png", dtype=np.int16)
    study = load_study(_dicom_2d(tmp / "dicom", source))
    # a PNG mask drawn on the radiograph's pixels: it has no geometry of its own (1 mm, the geometry-less
    # affine), and preprocessing must place it on the image's 0.5 mm pixels
    from PIL import Image

    Image.fromarray(MASK_2D.T).save(tmp / "mask.png")
    return study, read_image(tmp / "mask.png", dtype=np.int16)


@pytest.mark.parametrize("source", ["png", "none", "axial", "coronal"])
def test_2d_round_trip_and_the_same_pixels_reach_the_model(source: str, tmp_path: Path) -> None:
    ckpt = checkpoint(tmp_path, {"spatial_dims": 2, "spatial_size": [48, 32], "intensity": "minmax"})
    study, mask = study_2d(tmp_path, source)
    value, x = oracle_round_trip(ckpt, study, mask)
    assert value == 1.0
    # the display frame: every source gives the model the image as displayed, top-left object top-left
    expected = np.zeros((48, 32), dtype=np.float32)
    expected[4:44, 1:31] = IMAGE_2D / 200.0  # minmax to [0, 1], centred in the 48 x 32 crop/pad
    assert torch.allclose(x[0], torch.as_tensor(expected), atol=1e-5), source


@pytest.mark.parametrize("source", ["axial", "coronal"])
def test_a_png_mask_of_a_radiograph_lies_on_its_pixels_when_resampled(source: str, tmp_path: Path) -> None:
    """The radiograph has 0.5 mm pixels, its PNG mask none (1 mm by default): resampled to 1 mm, the mask
    must follow the image's pixels, not its own default geometry (which would make it twice as large)."""
    data = {"spatial_dims": 2, "spacing": [1.0, 1.0], "spatial_size": [24, 24], "intensity": "minmax"}
    ckpt = checkpoint(tmp_path, data)
    study, mask = study_2d(tmp_path, source)
    value, _ = oracle_round_trip(ckpt, study, mask)
    assert value > 0.85, value  # 2x down- and upsampling of a 10 x 8 object; misplaced it would be ~0.3


def test_display_frame_flips_a_stored_flipped_slice_and_transposes_a_transposed_one() -> None:
    flipped = LPS @ np.diag([1.0, -1.0, 1.0, 1.0])  # j runs anterior: stored upside down
    assert np.allclose(display_affine(flipped)[:2, :2], np.diag([1.0, -1.0]))
    transposed = np.array([[0, -1.0, 0, 0], [-1.0, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])  # i -> posterior
    assert np.allclose(display_affine(transposed)[:2, :2], [[0, 1.0], [1.0, 0]])
    sagittal = np.array([[0, 0, 1.0, 0], [-1.0, 0, 0, 0], [0, -1.0, 0, 0], [0, 0, 0, 1]])  # i -> P, j -> I
    assert np.allclose(display_affine(sagittal)[:2, :2], np.eye(2))


def test_a_transform_failure_is_a_typed_error_naming_the_file() -> None:
    """MONAI raises RuntimeError from inside a transform; a batch needs a typed error naming the study."""
    cfg = DataConfig.model_validate(
        {"manifest": "m.csv", "spatial_dims": 3, "spacing": [1.0, 1.0, 1.0], "spatial_size": [8, 8, 8]}
    )
    # a header claiming 10 m voxels (the largest a Study accepts is 100 m): resampling to 1 mm asks for ~256 TB
    study = Study(
        "s", np.zeros((4, 4, 4), np.float32), np.diag([1e4, 1e4, 1e4, 1.0]), "CT", Path("tiny.nii.gz"), "nifti"
    )
    with pytest.raises(PreprocessingError, match="tiny.nii.gz") as info:
        apply(build_transforms(cfg, "infer"), {IMAGE: study})
    assert info.value.code == "preprocessing" and "Spacingd" in str(info.value)
