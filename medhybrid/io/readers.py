"""Non-DICOM image files to :class:`~medhybrid.io.study.Study`: NIfTI (nibabel), NRRD/MHA/MHD
(SimpleITK), PNG (Pillow) and MedMNIST ``.npz`` archives. Geometry is kept (RAS affine, see
:mod:`medhybrid.io.study`)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import cast

import nibabel as nib
import numpy as np
import SimpleITK as sitk
from PIL import Image

from medhybrid.errors import ImageReadError, InputError, UnsupportedFormatError
from medhybrid.io.study import GEOMETRYLESS_2D_AFFINE, LPS_TO_RAS, QCReport, Study, Verdict, study_key

logger = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii", ".nii.gz")
PNG_SUFFIXES = (".png",)


def image_format(path: Path) -> str | None:
    """``nifti``, ``nrrd``, ``mha``, ``png`` or ``None`` from the file name."""
    name = path.name.lower()
    if name.endswith(NIFTI_SUFFIXES):
        return "nifti"
    if name.endswith((".nrrd", ".nhdr")):
        return "nrrd"
    if name.endswith((".mha", ".mhd")):
        return "mha"
    if name.endswith(PNG_SUFFIXES):
        return "png"
    return None


def read_image(path: Path, *, dtype: type = np.float32) -> Study:
    """Read one NIfTI / NRRD / MHA / PNG file.

    Args:
        dtype: voxel type of ``Study.array`` (float32 for images; pass e.g. ``np.int16`` for masks).

    Raises:
        InputError (missing file), UnsupportedFormatError, ImageReadError
    """
    path = Path(path)
    if not path.is_file():
        raise InputError("file not found", path=path, fix="check the path")
    fmt = image_format(path)
    if fmt is None:
        raise UnsupportedFormatError(
            "unknown image format", path=path, fix="use DICOM, .nii/.nii.gz, .nrrd, .mha/.mhd or .png"
        )
    try:
        if fmt == "nifti":
            array, affine = _read_nifti(path)
        elif fmt == "png":
            array, affine = _read_png(path)
        else:
            array, affine = _read_sitk(path)
    except (ImageReadError, InputError):
        raise
    except Exception as exc:  # the readers raise many types on damaged files
        raise ImageReadError(
            f"cannot be read as {fmt} ({type(exc).__name__}: {str(exc)[:160]})",
            path=path,
            fix="check that the file is complete and really is this format",
        ) from None
    return make_study(array, affine, path, fmt, dtype=dtype)


def make_study(
    array: np.ndarray,
    affine: np.ndarray,
    path: Path,
    fmt: str,
    *,
    dtype: type = np.float32,
    key: str | None = None,
) -> Study:
    """Validate geometry and wrap an array read from ``path`` into a Study (3D spatial, channels last)."""
    qc = QCReport()
    affine = np.asarray(affine, dtype=float)
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise ImageReadError(
            f"the affine is singular or not finite: {affine.tolist()}",
            path=path,
            fix="repair the header's sform/qform",
        )
    if array.ndim == 2:
        array = array[:, :, np.newaxis]
    if array.ndim == 5 and array.shape[3] == 1:  # NIfTI (x, y, z, t=1, c)
        array = array[:, :, :, 0]
    if array.ndim == 4:
        qc.warn("multichannel", f"{array.shape[3]} volumes/channels in the 4th dimension, kept as channels")
    if array.ndim not in (3, 4):
        raise ImageReadError(f"unsupported image shape {array.shape}", path=path, fix="give a 2D, 3D or 4D image")
    if not np.all(np.isfinite(array)):
        raise ImageReadError("voxel data holds NaN or infinity", path=path, fix="repair or re-export the image")
    if array.shape[2] == 1:
        qc.add(Verdict.OK, "single_slice", "one slice: a 2D image")
    return Study(
        key=key or study_key(str(path.resolve())),
        array=np.asarray(array, dtype=dtype),
        affine=affine,
        modality="OT",
        source=path,
        source_format=fmt,
        qc=qc,
    )


def load_nifti(path: Path) -> nib.Nifti1Image | nib.Nifti2Image:
    """nibabel's loader, typed (nib.load is declared to return any image format)."""
    return cast("nib.Nifti1Image | nib.Nifti2Image", nib.load(str(path)))


def _read_nifti(path: Path) -> tuple[np.ndarray, np.ndarray]:
    img = load_nifti(path)
    # get_fdata applies scl_slope/scl_inter; float32 is enough for every modality we read
    return np.asarray(img.get_fdata(dtype=np.float32)), np.asarray(img.affine, dtype=float)


def _read_png(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """PNG pixels as they are stored: grey (8/16-bit), palette *indices* (label maps), 1-bit as 0/1,
    colour as RGB channels; 1 mm pixels and the geometry-less 2D affine (DICOM's default axial orientation,
    as for a radiograph without ImageOrientationPatient: see :mod:`medhybrid.io.study`)."""
    with Image.open(path) as im:
        if im.mode in ("RGB", "RGBA", "CMYK", "YCbCr", "LAB", "HSV"):
            array = np.asarray(im.convert("RGB"))  # (rows, cols, 3)
        elif im.mode == "LA":
            array = np.asarray(im.convert("L"))
        elif im.mode == "PA":
            array = np.asarray(im.convert("P"))
        else:  # L, P, 1, I, I;16*, F: the stored values themselves
            array = np.asarray(im)
    array = array.astype(np.uint8) if array.dtype == bool else array
    # PIL gives (rows, cols[, 3]); medhybrid indexes (i=column, j=row): swap the two, keep channels last
    if array.ndim == 3:
        return np.transpose(array, (1, 0, 2))[:, :, np.newaxis, :], GEOMETRYLESS_2D_AFFINE.copy()
    return array.T, GEOMETRYLESS_2D_AFFINE.copy()


def _read_sitk(path: Path) -> tuple[np.ndarray, np.ndarray]:
    img = sitk.ReadImage(str(path))
    array = sitk.GetArrayFromImage(img)  # (k, j, i[, c])
    dim = img.GetDimension()
    if dim == 2:
        array = array[np.newaxis]
    spatial = np.moveaxis(array, (0, 1, 2), (2, 1, 0))
    return spatial, _ras_affine(img.GetDirection(), img.GetSpacing(), img.GetOrigin(), dim)


def _ras_affine(
    direction: tuple[float, ...], spacing: tuple[float, ...], origin: tuple[float, ...], dim: int
) -> np.ndarray:
    """RAS voxel-to-world affine from an ITK image's (LPS) direction, spacing and origin; a 4th (time)
    axis is dropped, a 2D image gets a unit third axis."""
    n = min(dim, 3)
    affine = np.eye(4)
    affine[:n, :n] = np.array(direction).reshape(dim, dim)[:n, :n] * np.array(spacing)[:n]
    affine[:n, 3] = np.array(origin)[:n]
    return LPS_TO_RAS @ affine


def read_geometry(path: Path) -> tuple[tuple[int, ...], np.ndarray]:
    """Spatial shape ``(I, J, K)`` and RAS affine of an image file without reading its voxels
    (NIfTI header via nibabel, NRRD/MHA via SimpleITK's ImageFileReader, PNG size).

    Raises:
        InputError, UnsupportedFormatError, ImageReadError
    """
    path = Path(path)
    if path.is_dir():
        raise UnsupportedFormatError(
            "a folder, not an image file (DICOM folders get their geometry from the DICOM reader)", path=path
        )
    if not path.is_file():
        raise InputError("file not found", path=path, fix="check the path")
    fmt = image_format(path)
    try:
        if fmt == "nifti":
            img = load_nifti(path)
            shape = tuple(int(s) for s in img.shape[:3])
            return shape + (1,) * (3 - len(shape)), np.asarray(img.affine, dtype=float)
        if fmt == "png":
            with Image.open(path) as im:
                return (im.size[0], im.size[1], 1), GEOMETRYLESS_2D_AFFINE.copy()
        if fmt in ("nrrd", "mha"):
            reader = sitk.ImageFileReader()
            reader.SetFileName(str(path))
            reader.ReadImageInformation()
            dim = reader.GetDimension()
            size = tuple(int(s) for s in reader.GetSize()[:3])
            affine = _ras_affine(reader.GetDirection(), reader.GetSpacing(), reader.GetOrigin(), dim)
            return size + (1,) * (3 - len(size)), affine
    except Exception as exc:
        raise ImageReadError(f"header cannot be read ({exc})", path=path, fix="check the file") from None
    raise UnsupportedFormatError("unknown image format", path=path, fix="use .nii/.nii.gz, .nrrd, .mha or .png")


def read_medmnist(path: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The splits of a MedMNIST ``.npz``: ``{split: (images (N, H, W[, D]) uint8, labels (N,))}``.

    Raises:
        ImageReadError if the archive is not a MedMNIST file.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError("file not found", path=path, fix="check the path")
    try:
        with np.load(path) as npz:
            keys = set(npz.files)
            splits = {}
            for split in ("train", "val", "test"):
                if f"{split}_images" in keys and f"{split}_labels" in keys:
                    splits[split] = (npz[f"{split}_images"], np.asarray(npz[f"{split}_labels"]).reshape(-1))
    except Exception as exc:  # np.load raises OSError, ValueError, BadZipFile, TypeError (a .npy), ...
        raise ImageReadError(
            f"cannot be read as a MedMNIST .npz ({type(exc).__name__}: {exc})", path=path, fix="check the file"
        ) from None
    if not splits:
        raise ImageReadError(
            f"no MedMNIST arrays (e.g. train_images/train_labels) among {sorted(keys)}",
            path=path,
            fix="give an official MedMNIST .npz file",
        )
    for split, (images, labels) in splits.items():
        if len(labels) != len(images) and len(labels) % max(len(images), 1) == 0:
            raise ImageReadError(
                f"{split}: {len(labels) // max(len(images), 1)} labels per image (a multi-label dataset, e.g. "
                "ChestMNIST); medhybrid's manifests hold one class label per study",
                path=path,
                fix="pick one label column and save a single-label .npz",
            )
        if len(images) != len(labels):
            raise ImageReadError(f"{split}: {len(images)} images but {len(labels)} labels", path=path)
    return splits


def medmnist_study(images: np.ndarray, index: int, source: Path, split: str) -> Study:
    """One MedMNIST sample as a Study, 1 mm isotropic (MedMNIST keeps no geometry): a 2D image gets the
    geometry-less 2D affine, as its PNG export does; a 3D volume the identity, as its NIfTI export does.

    MedMNIST stores 2D images as (H, W) and 3D as (D?, H, W)-like cubes; both are transposed to the
    medhybrid (i=column, j=row, k) order.
    """
    sample = np.asarray(images[index])
    if sample.ndim == 3 and sample.shape[-1] == 3 and images.ndim == 4 and sample.shape[0] != 3:
        array = np.transpose(sample, (1, 0, 2))[:, :, np.newaxis, :]  # RGB 2D
    else:
        array = sample.T
    affine = GEOMETRYLESS_2D_AFFINE if array.ndim == 2 or array.shape[2] == 1 else np.eye(4)
    key = study_key(f"{source.resolve()}#{split}/{index}")
    return make_study(array, affine.copy(), source, "medmnist", key=key)
