"""The one place MONAI transforms are built: from a :class:`DataConfig` to a ``Compose`` per mode.

The same ``DataConfig`` is stored in every checkpoint, and inference rebuilds its transforms with
:func:`build_transforms` in ``"infer"`` mode, so training and inference cannot drift apart.

Modes:
- ``train``: deterministic preprocessing (cached), then random patch sampling and augmentation;
- ``val``: deterministic preprocessing only, whole images: at a physical ``spacing`` the whole field of view
  (padded up to one window; larger scans are inferred window by window, :mod:`medhybrid.infer.windows`),
  otherwise cropped/padded to ``spatial_size``. Training crops/pads to ``spatial_size`` (centre) unless it
  samples patches;
- ``infer``: like ``val`` without labels or masks.
"""

from __future__ import annotations

import re
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from monai.data.meta_tensor import MetaTensor
from monai.transforms import (
    ClipIntensityPercentilesd,
    Compose,
    EnsureTyped,
    MapTransform,
    NormalizeIntensityd,
    Orientationd,
    RandAdjustContrastd,
    RandAffined,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandGaussianNoised,
    RandGaussianSmoothd,
    RandScaleIntensityd,
    RandShiftIntensityd,
    RandSimulateLowResolutiond,
    ResizeWithPadOrCropd,
    ScaleIntensityd,
    ScaleIntensityRanged,
    Spacingd,
    SpatialPadd,
)

from medhybrid.config import CT_WINDOWS, DataConfig
from medhybrid.errors import InputError, MedHybridError, PreprocessingError
from medhybrid.io.readers import read_image
from medhybrid.io.scan import load_study
from medhybrid.io.study import Study, display_affine

Mode = Literal["train", "val", "infer"]
IMAGE, MASK, LABEL = "image", "mask", "label"


def frame_affine(affine: np.ndarray, spatial_dims: int) -> np.ndarray:
    """The world frame a study is preprocessed in: its RAS affine for a 3D model, its display frame
    (:func:`medhybrid.io.study.display_affine`) for a 2D model. Model outputs carry the affine of the
    model grid in the same frame, and go back to the scan through this one."""
    return display_affine(affine) if spatial_dims == 2 else np.asarray(affine, dtype=np.float64)


def png_mask_on_image(mask: Study, image: Study) -> Study:
    """A PNG mask of a 2D image of its size, placed on the image's pixels: a PNG has no geometry of its
    own (a mask drawn on a DICOM radiograph's pixels). Any other mask keeps its geometry."""
    if mask.source_format != "png" or mask.spatial_shape != image.spatial_shape:
        return mask
    return Study(mask.key, mask.array, image.affine, mask.modality, mask.source, "png")


class LoadStudyd(MapTransform):
    """Read ``image`` (any source :func:`load_study` takes: file, DICOM file or folder, or a loaded
    :class:`Study`) and ``mask`` into channel-first ``MetaTensor`` s carrying the affine of
    :func:`frame_affine` (RAS in 3D, the display frame in 2D).

    MONAI's ``LoadImaged`` is not used because our reader does the DICOM series selection, geometry
    checks and typed errors that the rest of medhybrid relies on.
    """

    def __init__(self, keys: Sequence[str], spatial_dims: int = 3) -> None:
        super().__init__(keys, allow_missing_keys=True)
        self.spatial_dims = spatial_dims

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        image: Study | None = None
        for key in self.key_iterator(d):
            path = d[key]
            if isinstance(path, Study):  # already loaded (inference selects and reads series itself)
                study, path = path, path.source
            else:
                study = read_image(path, dtype=np.int16) if key == MASK else load_study(path)
            if key == IMAGE:
                image = study
            elif image is not None and self.spatial_dims == 2:
                study = png_mask_on_image(study, image)
            # Study arrays are (I, J, K[, C]); MONAI wants channels first.
            array = np.moveaxis(study.array, -1, 0) if study.array.ndim == 4 else study.array[None]
            if self.spatial_dims == 2:
                if array.shape[-1] != 1:
                    raise InputError(
                        f"a 2D pipeline got a volume of {array.shape[-1]} slices",
                        path=path,
                        fix="set data.spatial_dims: 3, or give single-slice images",
                    )
                array = array[..., 0]
            # no copy when the study is float32 already (a 512x512x400 CT is 400 MB): the tensor views it
            tensor = torch.from_numpy(np.asarray(array, dtype=np.float32))
            affine = frame_affine(study.affine, self.spatial_dims)
            d[key] = MetaTensor(tensor, affine=torch.as_tensor(affine, dtype=torch.float64))
        return d


def intensity_transforms(cfg: DataConfig) -> list[Any]:
    """The intensity preset: CT windows to [0, 1], MR percentile clip + z-score, or min-max to [0, 1]."""
    if cfg.intensity in CT_WINDOWS:
        level, width = CT_WINDOWS[cfg.intensity]
        return [
            ScaleIntensityRanged(
                IMAGE, a_min=level - width / 2, a_max=level + width / 2, b_min=0.0, b_max=1.0, clip=True
            )
        ]
    if cfg.intensity == "mr_zscore":
        return [ClipIntensityPercentilesd(IMAGE, lower=0.5, upper=99.5), NormalizeIntensityd(IMAGE, nonzero=True)]
    if cfg.intensity == "minmax":
        return [ScaleIntensityd(IMAGE, minv=0.0, maxv=1.0)]
    return []


def deterministic_transforms(cfg: DataConfig, keys: Sequence[str]) -> list[Any]:
    """Load, orient, resample and normalise: everything that does not change from epoch to epoch."""
    modes = ["nearest" if k == MASK else "bilinear" for k in keys]
    out: list[Any] = [LoadStudyd(keys, cfg.spatial_dims)]
    if cfg.orientation:
        out.append(Orientationd(keys, axcodes=cfg.orientation, labels=(("L", "R"), ("P", "A"), ("I", "S"))))
    if cfg.spacing:
        # float32 resampling grids: float64 (MONAI's default) needs 2.8x the memory for the same result
        # at image precision (+2.8 GB when a 512x512x400 CT is resampled)
        out.append(Spacingd(keys, pixdim=cfg.spacing, mode=modes, dtype=np.float32))
    out += intensity_transforms(cfg)
    return out


def augment_transforms(cfg: DataConfig, keys: Sequence[str]) -> list[Any]:
    a = cfg.augment
    modes = ["nearest" if k == MASK else "bilinear" for k in keys]
    out: list[Any] = []
    if a.flip_prob > 0:
        out += [RandFlipd(keys, prob=a.flip_prob, spatial_axis=axis) for axis in range(cfg.spatial_dims)]
    if a.affine_prob > 0 and (a.rotate_degrees > 0 or a.scale > 0):
        rot = np.deg2rad(a.rotate_degrees)
        out.append(
            RandAffined(
                keys,
                prob=a.affine_prob,
                rotate_range=[rot] * (1 if cfg.spatial_dims == 2 else 3),
                scale_range=[a.scale] * cfg.spatial_dims,
                mode=modes,
                padding_mode="zeros",
            )
        )
    if a.intensity_prob > 0:
        if a.intensity_scale > 0:
            out.append(RandScaleIntensityd(IMAGE, factors=a.intensity_scale, prob=a.intensity_prob))
        if a.intensity_shift > 0:
            out.append(RandShiftIntensityd(IMAGE, offsets=a.intensity_shift, prob=a.intensity_prob))
        if a.noise_std > 0:
            out.append(RandGaussianNoised(IMAGE, std=a.noise_std, prob=a.intensity_prob))
        # acquisition changes, as nnU-Net's augmentation has them: tone curve, softer kernel, lower resolution
        if a.gamma > 0:
            out.append(RandAdjustContrastd(IMAGE, gamma=(1.0 - a.gamma, 1.0 + a.gamma), prob=a.intensity_prob))
        if a.blur_sigma > 0:
            sigma = (min(0.25, a.blur_sigma), a.blur_sigma)
            # (sigma_z is unused on 2D images)
            out.append(RandGaussianSmoothd(IMAGE, sigma_x=sigma, sigma_y=sigma, sigma_z=sigma, prob=a.intensity_prob))
        if a.lowres_zoom > 0:
            up = "trilinear" if cfg.spatial_dims == 3 else "bilinear"  # MONAI's default is 3D only
            out.append(
                RandSimulateLowResolutiond(
                    IMAGE, prob=a.intensity_prob, zoom_range=(a.lowres_zoom, 1.0), upsample_mode=up
                )
            )
    return out


def uses_masks(cfg: DataConfig) -> bool:
    return cfg.task in ("segmentation", "multitask")


def patch_sampling(cfg: DataConfig) -> bool:
    """Segmentation trains on random patches (foreground-oversampled) when ``patch_size`` is set."""
    return cfg.task == "segmentation" and cfg.patch_size is not None


def model_window(cfg: DataConfig) -> tuple[int, ...] | None:
    """The input size the model is run on window by window over a larger scan
    (:mod:`medhybrid.infer.windows`): the training patch for segmentation on patches, ``spatial_size`` for a
    model preprocessed at a physical ``spacing``; None for images cropped/padded to one size (no spacing)."""
    if cfg.patch_size is not None and patch_sampling(cfg):
        return tuple(cfg.patch_size)
    return tuple(cfg.spatial_size) if cfg.spacing else None


def apply(transform: Compose, item: Mapping[Hashable, Any]) -> Any:
    """Run ``transform`` on ``item``; every failure comes out as a typed error naming the file.

    MONAI wraps every exception of a transform in ``RuntimeError("applying transform ...")``. A medhybrid
    error raised inside (file, fix) is taken back out of the chain as itself; anything else (a MONAI or
    torch error on a study the transforms cannot handle) becomes a :class:`PreprocessingError` naming the
    study's file, the transform and the cause, so one bad study is reported and the batch goes on.
    """
    try:
        return transform(item)
    except Exception as exc:
        cause: BaseException | None = exc
        while cause is not None and not isinstance(cause, MedHybridError):
            cause = cause.__cause__
        if cause is not None:
            raise cause from None
        raise _preprocessing_error(exc, item) from exc


def _preprocessing_error(exc: Exception, item: Mapping[Hashable, Any]) -> PreprocessingError:
    image = item.get(IMAGE)
    path = image.source if isinstance(image, Study) else image if isinstance(image, (str, Path)) else None
    step = re.search(r"<monai\.transforms\.[\w.]*?(\w+) object", str(exc))
    root: BaseException = exc
    while root.__cause__ is not None:
        root = root.__cause__
    detail = str(root).strip().splitlines()[0][:200] if str(root).strip() else type(root).__name__
    return PreprocessingError(
        f"preprocessing failed in {step.group(1) if step else type(exc).__name__}: {type(root).__name__}: {detail}",
        path=path,
        fix="check the image's geometry and size against the pipeline's preprocessing (data section)",
    )


def build_transforms(cfg: DataConfig, mode: Mode) -> Compose:
    """The full pipeline for one mode (see the module docstring)."""
    keys = [IMAGE, MASK] if uses_masks(cfg) and mode != "infer" else [IMAGE]
    steps = deterministic_transforms(cfg, keys)
    if patch_sampling(cfg):
        if mode == "train":
            patch = cfg.patch_size
            assert patch is not None
            steps += [
                SpatialPadd(keys, spatial_size=patch),
                RandCropByPosNegLabeld(
                    keys,
                    label_key=MASK,
                    spatial_size=patch,
                    pos=cfg.foreground_fraction,
                    neg=1.0 - cfg.foreground_fraction,
                    num_samples=cfg.samples_per_image,
                ),
            ]
    elif cfg.spacing and mode != "train":
        # the whole field of view at the model's spacing, padded up to one window: windows cover the rest
        steps.append(SpatialPadd(keys, spatial_size=cfg.spatial_size))
    else:
        steps.append(ResizeWithPadOrCropd(keys, spatial_size=cfg.spatial_size))
    if mode == "train":
        steps += augment_transforms(cfg, keys)
    if mode == "val":
        steps.append(VoxelVolumed())
    steps.append(EnsureTyped(keys, dtype=torch.float32, track_meta=mode == "infer"))
    return Compose(steps)


VOXEL_ML = "voxel_ml"


class VoxelVolumed(MapTransform):
    """Record the volume (mL) of one model-grid voxel of ``image`` under ``voxel_ml`` before validation
    drops the affine: the lesion score's minimum size needs it, measured as inference measures it."""

    def __init__(self) -> None:
        super().__init__([IMAGE])

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        a = np.asarray(d[IMAGE].affine, dtype=np.float64)
        n = a.shape[0] - 1  # spatial axes of the affine (a 2D grid: its pixel area x 1 mm, as inference does)
        d[VOXEL_ML] = float(np.prod(np.linalg.norm(a[:n, :n], axis=0))) / 1000.0
        return d
