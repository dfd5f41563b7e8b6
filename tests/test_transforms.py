"""Preprocessing built from the config: real files through the MONAI pipeline, every mode."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from medhybrid.config import DataConfig
from medhybrid.data.synth import synthesize_cohort
from medhybrid.data.transforms import apply, build_transforms
from medhybrid.errors import InputError
from medhybrid.io.manifest import read_manifest


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synthesize_cohort(tmp_path_factory.mktemp("c"), n=2, dims=3, fmt="nifti", seed=1)


def _item(manifest: Path, index: int = 1) -> dict:
    row = read_manifest(manifest).rows[index]
    return {"image": str(row.image), "mask": str(row.mask), "label": row.label}


def test_ct_window_spacing_and_size(cohort: Path) -> None:
    cfg = DataConfig(
        manifest=cohort,
        task="multitask",
        spatial_size=(48, 48, 24),
        spacing=(1.0, 1.0, 3.0),
        intensity="ct_soft_tissue",
    )
    # validation/inference keep the whole field of view at the model's spacing (64 x 0.75 mm = 48 voxels of
    # 1 mm; 32 x 2.5 mm = 26.7 -> 27 slices of 3 mm), padded up to spatial_size, never cropped to it
    out = build_transforms(cfg, "val")(_item(cohort))
    assert out["image"].shape == (1, 48, 48, 27) and out["mask"].shape == (1, 48, 48, 27)
    assert float(out["image"].min()) >= 0.0 and float(out["image"].max()) <= 1.0
    assert set(out["mask"].unique().tolist()) <= {0.0, 1.0}
    small = DataConfig(**{**cfg.model_dump(), "spatial_size": (56, 56, 30)})
    assert build_transforms(small, "val")(_item(cohort))["image"].shape == (1, 56, 56, 30)  # padded up
    # training crops/pads to spatial_size
    train_out = build_transforms(DataConfig(**{**cfg.model_dump(), "augment": {"flip_prob": 0.0}}), "train")(
        _item(cohort)
    )
    assert train_out["image"].shape == (1, 48, 48, 24)


def test_train_mode_is_random_but_seedable(cohort: Path) -> None:
    cfg = DataConfig(
        manifest=cohort,
        task="multitask",
        spatial_size=(64, 64, 32),
        augment={
            "flip_prob": 0.5,
            "affine_prob": 1.0,
            "rotate_degrees": 15,
            "intensity_prob": 1.0,
            "intensity_scale": 0.1,
            "noise_std": 0.05,
        },
    )
    a, b = build_transforms(cfg, "train"), build_transforms(cfg, "train")
    a.set_random_state(seed=3)
    b.set_random_state(seed=3)
    x, y = a(_item(cohort)), b(_item(cohort))
    assert torch.equal(x["image"], y["image"])
    b.set_random_state(seed=4)
    assert not torch.equal(x["image"], b(_item(cohort))["image"])


def test_segmentation_patches_oversample_foreground(cohort: Path) -> None:
    cfg = DataConfig(
        manifest=cohort,
        task="segmentation",
        spatial_size=(64, 64, 32),
        patch_size=(16, 16, 8),
        foreground_fraction=1.0,
        samples_per_image=4,
        augment={"flip_prob": 0.0},
    )
    t = build_transforms(cfg, "train")
    t.set_random_state(seed=0)
    patches = t(_item(cohort))
    assert len(patches) == 4
    assert all(p["image"].shape == (1, 16, 16, 8) for p in patches)
    assert all(p["mask"].sum() > 0 for p in patches)


def test_two_d_pipeline_refuses_volumes(cohort: Path) -> None:
    cfg = DataConfig(manifest=cohort, spatial_dims=2, orientation=None, spatial_size=(32, 32))
    with pytest.raises(InputError, match="2D pipeline got a volume"):
        apply(build_transforms(cfg, "infer"), {"image": _item(cohort)["image"]})


def test_acquisition_augmentations_change_the_image_as_configured(cohort: Path) -> None:
    """gamma, blur and simulated low resolution (nnU-Net's acquisition changes), each seedable."""
    base = {"flip_prob": 0.0, "intensity_prob": 1.0}
    plain = DataConfig(manifest=cohort, spatial_size=(64, 64, 32), augment=base)
    x = build_transforms(plain, "train")(_item(cohort))["image"]
    for extra, smoother in (({"gamma": 0.4}, False), ({"blur_sigma": 1.5}, True), ({"lowres_zoom": 0.3}, True)):
        cfg = DataConfig(manifest=cohort, spatial_size=(64, 64, 32), augment={**base, **extra})
        a, b = build_transforms(cfg, "train"), build_transforms(cfg, "train")
        a.set_random_state(seed=3)
        b.set_random_state(seed=3)
        y = a(_item(cohort))["image"]
        assert torch.equal(y, b(_item(cohort))["image"]), extra
        assert y.shape == x.shape and not torch.allclose(y, x), extra
        if smoother:  # less voxel-to-voxel variation than the clean image
            assert y.diff(dim=1).abs().mean() < 0.9 * x.diff(dim=1).abs().mean(), extra
        assert not torch.equal(y, build_transforms(cfg, "val")(_item(cohort))["image"])  # train only


def test_acquisition_augmentations_run_on_2d_images(tmp_path: Path) -> None:
    cohort = synthesize_cohort(tmp_path, n=4, dims=2, fmt="nifti", seed=2)
    aug = {"flip_prob": 0.0, "intensity_prob": 1.0, "gamma": 0.3, "blur_sigma": 1.0, "lowres_zoom": 0.5}
    cfg = DataConfig(manifest=cohort, spatial_dims=2, spatial_size=(64, 64), augment=aug)
    t = build_transforms(cfg, "train")
    t.set_random_state(seed=0)
    out = t(_item(cohort))["image"]
    assert out.shape == (1, 64, 64) and torch.isfinite(out).all()
