"""Non-DICOM image files to :class:`~medhybrid.io.study.Study`: NIfTI (nibabel), NRRD/MHA/MHD
(SimpleITK), PNG (Pillow) and MedMNIST ``.npz`` archives. Geometry is kept (RAS affine, see
:mod:`medhybrid.io.study`)."""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import nibabel as nib
import numpy as np
import SimpleITK as sitk
from PIL import Image

from medhybrid.errors import ConfigError, ImageReadError, InputError, MedHybridError, UnsupportedFormatError
from medhybrid.io.study import GEOMETRYLESS_2D_AFFINE, LPS_TO_RAS, QCReport, Study, Verdict, study_key

logger = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii", ".nii.gz")
PNG_SUFFIXES = (".png",)

MAX_IMAGE_BYTES = 4 * 1024**3
"""Default ceiling on the memory one image file may declare (1024^3 float32 voxels); the environment variable
``MEDHYBRID_MAX_IMAGE_BYTES`` (a number of bytes) overrides it."""
MAX_IMAGE_BYTES_ENV = "MEDHYBRID_MAX_IMAGE_BYTES"
# deflate (gzip, zlib) cannot compress better than 1032:1 (a 258-byte match coded in 2 bits), so compressed data
# whose header declares more bytes than that is truncated or lying. A blank mask already reaches ~1029:1, so a
# round "1000x" would refuse real files.
MAX_DEFLATE_RATIO = 1032
_MAX_HEADER_BYTES = 4 * 1024**2  # NRRD / MetaImage text headers, LIST of data files included
_MAX_DATA_FILES = 100_000


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


def read_image(path: Path, *, dtype: type = np.float32, allow_external_data: bool = False) -> Study:
    """Read one NIfTI / NRRD / MHA / PNG file.

    The header is checked before any voxel is allocated: its declared size must fit in the file (or, gzip,
    within deflate's 1032:1) and in :func:`max_image_bytes`; ``.mhd`` / ``.nhdr`` data files must be in the
    header's folder.

    Args:
        dtype: voxel type of ``Study.array`` (float32 for images; pass e.g. ``np.int16`` for masks).
        allow_external_data: let a ``.mhd`` / ``.nhdr`` header name data files outside its own folder
            (refused by default: a header could point at any file on the machine).

    Raises:
        InputError (missing file), UnsupportedFormatError, ImageReadError, ConfigError (a bad
        ``MEDHYBRID_MAX_IMAGE_BYTES``)
    """
    path = Path(path)
    if not path.is_file():
        raise InputError("file not found", path=path, fix="check the path")
    fmt = image_format(path)
    if fmt is None:
        raise UnsupportedFormatError(
            "unknown image format", path=path, fix="use DICOM, .nii/.nii.gz, .nrrd, .mha/.mhd or .png"
        )
    out_itemsize = np.dtype(dtype).itemsize
    try:
        if fmt == "nifti":
            array, affine = _read_nifti(path, out_itemsize)
        elif fmt == "png":
            array, affine = _read_png(path)
        else:
            array, affine = _read_sitk(path, allow_external_data, out_itemsize)
    except MedHybridError:
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


def _read_nifti(path: Path, out_itemsize: int) -> tuple[np.ndarray, np.ndarray]:
    img = load_nifti(path)  # the header only; voxels are read by get_fdata
    _check_nifti_header(path, img, out_itemsize=out_itemsize)
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


def _read_sitk(path: Path, allow_external_data: bool, out_itemsize: int) -> tuple[np.ndarray, np.ndarray]:
    img = _sitk_header(path, allow_external_data=allow_external_data, out_itemsize=out_itemsize).Execute()
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


def read_geometry(path: Path, *, allow_external_data: bool = False) -> tuple[tuple[int, ...], np.ndarray]:
    """Spatial shape ``(I, J, K)`` and RAS affine of an image file without reading its voxels
    (NIfTI header via nibabel, NRRD/MHA via SimpleITK's ImageFileReader, PNG size). The header gets the
    same checks as in :func:`read_image` (declared size, data files), so a file this accepts reads.

    Raises:
        InputError, UnsupportedFormatError, ImageReadError, ConfigError
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
            _check_nifti_header(path, img, out_itemsize=4)
            shape = tuple(int(s) for s in img.shape[:3])
            return shape + (1,) * (3 - len(shape)), np.asarray(img.affine, dtype=float)
        if fmt == "png":
            with Image.open(path) as im:
                return (im.size[0], im.size[1], 1), GEOMETRYLESS_2D_AFFINE.copy()
        if fmt in ("nrrd", "mha"):
            reader = _sitk_header(path, allow_external_data=allow_external_data, out_itemsize=4)
            dim = reader.GetDimension()
            size = tuple(int(s) for s in reader.GetSize()[:3])
            affine = _ras_affine(reader.GetDirection(), reader.GetSpacing(), reader.GetOrigin(), dim)
            return size + (1,) * (3 - len(size)), affine
    except MedHybridError:
        raise
    except Exception as exc:
        raise ImageReadError(f"header cannot be read ({exc})", path=path, fix="check the file") from None
    raise UnsupportedFormatError("unknown image format", path=path, fix="use .nii/.nii.gz, .nrrd, .mha or .png")


# --- header checks before any voxel is allocated ----------------------------------------------------
# Hand-written because no library does this: nibabel and ITK allocate the whole declared array first and
# notice a short file only while filling it (a 61 KB header claiming 1024^3 voxels costs ~4 GB and ~20 s
# before the error), and ITK/teem follow a .mhd / .nhdr data-file path wherever it points (/etc/passwd,
# ../../secret). The NRRD / MetaImage text headers are parsed here only to find where the data is (attached
# after the header or in which data files, and its encoding); sizes and pixel types come from nibabel and
# SimpleITK.


def max_image_bytes() -> int:
    """The in-memory ceiling on one image: ``MEDHYBRID_MAX_IMAGE_BYTES`` if set, else :data:`MAX_IMAGE_BYTES`.

    Raises:
        ConfigError if the variable is not a positive whole number of bytes.
    """
    raw = os.environ.get(MAX_IMAGE_BYTES_ENV, "").strip()
    if not raw:
        return MAX_IMAGE_BYTES
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value <= 0:
        raise ConfigError(
            f"{MAX_IMAGE_BYTES_ENV}={raw!r} is not a positive number of bytes",
            fix=f"set it to a whole number of bytes, e.g. {MAX_IMAGE_BYTES}, or unset it",
        )
    return value


def _check_nifti_header(path: Path, img: nib.Nifti1Image | nib.Nifti2Image, *, out_itemsize: int) -> None:
    """Refuse a NIfTI header whose declared voxels cannot be in the file or exceed the memory ceiling.

    Raises:
        ImageReadError, ConfigError
    """
    header = img.header
    shape = tuple(int(s) for s in header.get_data_shape())
    # the loaded header's vox_offset is reset for saving; the proxy keeps where the voxels are in this file
    offset = int(getattr(img.dataobj, "offset", header.get_data_offset()))
    compressed = path.name.lower().endswith(".gz")  # nibabel picks gzip by the same rule
    stored = path.stat().st_size if compressed else path.stat().st_size - offset
    _check_declared_size(
        path,
        n_voxels=math.prod(shape),
        voxel_bytes=header.get_data_dtype().itemsize,
        components=1,
        out_itemsize=out_itemsize,
        encoding="gzip" if compressed else "raw",
        stored=max(stored, 0),
        where="the file",
        overhead=offset if compressed else 0,  # the gzip stream holds the header too
    )


def _sitk_header(path: Path, *, allow_external_data: bool = False, out_itemsize: int = 4) -> sitk.ImageFileReader:
    """SimpleITK's reader for a NRRD / MetaImage file, its header read and checked: data files confined to the
    header's folder (unless ``allow_external_data``), the declared size against the data and the ceiling.
    ``Execute()`` on the result reads the voxels.

    Raises:
        ImageReadError, ConfigError
    """
    layout = _nrrd_layout(path) if image_format(path) == "nrrd" else _metaimage_layout(path)
    if not allow_external_data:
        _confine_data_files(path, layout.data_files)
    stored, where = _stored_bytes(path, layout)  # before SimpleITK, which names no missing data file
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    components = int(reader.GetNumberOfComponents())
    bits = re.search(r"(\d+)-bit", sitk.GetPixelIDValueAsString(reader.GetPixelID()))
    if bits is None:  # every pixel type SimpleITK reads from a file is "[vector of] N-bit ..."
        raise ImageReadError(
            f"unknown pixel type {sitk.GetPixelIDValueAsString(reader.GetPixelID())!r}",
            path=path,
            fix="convert the image to a scalar or vector integer / float type",
        )
    _check_declared_size(
        path,
        n_voxels=math.prod(int(s) for s in reader.GetSize()),
        voxel_bytes=components * int(bits.group(1)) // 8,
        components=components,
        out_itemsize=out_itemsize,
        encoding=layout.encoding,
        stored=stored,
        where=where,
    )
    return reader


def _check_declared_size(
    path: Path,
    *,
    n_voxels: int,
    voxel_bytes: int,
    components: int,
    out_itemsize: int,
    encoding: str,
    stored: int,
    where: str,
    overhead: int = 0,
) -> None:
    """Raise unless ``n_voxels`` of ``voxel_bytes`` (``components`` values each) can be in ``stored`` bytes of
    ``encoding`` (raw, hex, text, gzip; others unchecked) and fit in memory as float32 or ``out_itemsize``."""
    declared = n_voxels * voxel_bytes
    claim = f"header declares {n_voxels:,} voxels ({_size_text(declared)})"
    broken = "the file is truncated or its header is wrong"
    fix = "re-export or re-download the image, or correct the header's sizes and data type"
    if encoding == "gzip":
        if declared + overhead > MAX_DEFLATE_RATIO * stored:
            raise ImageReadError(
                f"{claim} but {where} holds only {stored:,} compressed bytes, more than gzip can compress "
                f"({MAX_DEFLATE_RATIO}:1); {broken}",
                path=path,
                fix=fix,
            )
    elif encoding in ("raw", "hex", "text"):
        # at least: the bytes themselves, two hex digits per byte, one character per text value
        needed = {"raw": declared, "hex": 2 * declared, "text": n_voxels * components}[encoding]
        if needed > stored:
            how = "" if encoding == "raw" else f" (its {encoding} encoding needs at least {needed:,})"
            raise ImageReadError(f"{claim} but {where} holds only {stored:,} bytes{how}; {broken}", path=path, fix=fix)
    in_memory = n_voxels * components * max(4, voxel_bytes // max(components, 1), out_itemsize)
    limit = max_image_bytes()
    if in_memory > limit:
        raise ImageReadError(
            f"{claim}, {_size_text(in_memory)} in memory, above the limit of {_size_text(limit)}",
            path=path,
            fix=f"check the header; for an image this large set {MAX_IMAGE_BYTES_ENV} to more bytes (now {limit})",
        )


def _size_text(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:,} bytes"


@dataclass(frozen=True)
class _DataLayout:
    """Where a NRRD / MetaImage header puts its voxels, from the header text."""

    encoding: str  # raw, text, hex, gzip (also zlib: the same deflate bound), bzip2 or another codec name
    header_bytes: int  # where attached data starts
    data_files: tuple[str, ...] = ()  # as written, relative to the header's folder; () = attached after the header
    skip: int = 0  # bytes before the data in each data file; -1: the data is at the end of it


def _header_lines(path: Path) -> Iterator[tuple[str, int]]:
    """The lines of a text header (line ending stripped) with the byte offset after each, up to 4 MiB."""
    end = 0
    with path.open("rb") as f:
        while line := f.readline(_MAX_HEADER_BYTES + 1):
            end += len(line)
            if end > _MAX_HEADER_BYTES:
                raise ImageReadError(
                    f"no end of header in the first {_MAX_HEADER_BYTES // 1024**2} MiB",
                    path=path,
                    fix="check that the file really is a NRRD / MetaImage file",
                )
            yield line.decode("latin-1").rstrip("\r\n"), end


def _nrrd_layout(path: Path) -> _DataLayout:
    """NRRD: ``field: value`` lines after the ``NRRD000x`` magic, ending at a blank line (attached data follows)
    or at the end of a detached header; ``data file: LIST`` is followed by one file name per line."""
    lines = _header_lines(path)
    magic, header_end = next(lines, ("", 0))
    if not magic.startswith("NRRD"):
        raise ImageReadError("not a NRRD file (no NRRD000x magic)", path=path, fix="check the file")
    fields: dict[str, str] = {}
    listed: list[str] | None = None
    for line, end in lines:
        if not line.strip():
            header_end = end
            break
        header_end = end
        if listed is not None:
            listed.append(line.strip())
            continue
        key, sep, value = line.partition(": ")
        if line.startswith("#") or not sep or ":=" in key:  # comments and key:=value pairs
            continue
        key = key.replace(" ", "").lower()  # "data file" / "datafile", "byte skip" / "byteskip"
        fields[key] = value.strip()
        if key == "datafile" and value.upper().split()[:1] == ["LIST"]:
            listed = []
    codecs = {"txt": "text", "ascii": "text", "gz": "gzip", "bz2": "bzip2"}
    encoding = fields.get("encoding", "raw").lower()
    data_file = fields.get("datafile")
    return _DataLayout(
        encoding=codecs.get(encoding, encoding),
        header_bytes=header_end,
        data_files=() if data_file is None else _data_file_names(path, data_file, listed or []),
        skip=_int_field(path, fields, "byteskip"),
    )


def _metaimage_layout(path: Path) -> _DataLayout:
    """MetaImage: ``Key = Value`` lines; ``ElementDataFile`` comes last and is ``LOCAL`` (the data follows),
    a file name, ``LIST`` (one file name per following line) or a printf pattern."""
    fields: dict[str, str] = {}
    listed: list[str] | None = None
    header_end = 0
    for line, end in _header_lines(path):
        if listed is not None:
            if not line.strip():
                break
            listed.append(line.strip())
            continue
        header_end = end
        key, sep, value = line.partition("=")
        if not sep:
            continue
        key = key.strip().lower()
        fields[key] = value.strip()
        if key == "elementdatafile":
            if value.upper().split()[:1] != ["LIST"]:
                break
            listed = []
    data_file = fields.get("elementdatafile")
    if data_file is None:
        raise ImageReadError("no ElementDataFile in the MetaImage header", path=path, fix="check the file")
    if fields.get("binarydata", "true").lower() == "false":
        encoding = "text"
    else:
        encoding = "gzip" if fields.get("compresseddata", "false").lower() == "true" else "raw"
    return _DataLayout(
        encoding=encoding,
        header_bytes=header_end,
        data_files=() if data_file.upper() == "LOCAL" else _data_file_names(path, data_file, listed or []),
        skip=_int_field(path, fields, "headersize"),
    )


def _int_field(path: Path, fields: dict[str, str], key: str) -> int:
    try:
        return int(fields.get(key, "0"))
    except ValueError:
        raise ImageReadError(
            f"header field {key} is not a whole number: {fields[key]!r}", path=path, fix="correct the header"
        ) from None


def _data_file_names(path: Path, value: str, listed: list[str]) -> tuple[str, ...]:
    """The data files a NRRD ``data file`` / MetaImage ``ElementDataFile`` value names: one file, ``LIST``
    (``listed``) or ``pattern%03d.raw min max step`` (NRRD may add a sub-dimension)."""
    tokens = value.split()
    if tokens and tokens[0].upper() == "LIST":
        names = tuple(listed)
    elif tokens and "%" in tokens[0] and len(tokens) in (4, 5):
        try:
            lo, hi, step = (int(t) for t in tokens[1:4])
            indices = range(lo, hi + (1 if step > 0 else -1), step)
            if len(indices) > _MAX_DATA_FILES:
                raise ValueError(f"{len(indices):,} files")
            names = tuple(tokens[0] % i for i in indices)
        except (TypeError, ValueError) as exc:
            raise ImageReadError(
                f"cannot expand the data file pattern {value!r} ({exc})",
                path=path,
                fix="give 'pattern%03d.raw min max step' with whole numbers, step not 0",
            ) from None
    else:
        names = (value,) if value else ()
    if not names:
        raise ImageReadError(f"the data file field {value!r} names no file", path=path, fix="list the data files")
    return names


def _confine_data_files(path: Path, names: tuple[str, ...]) -> None:
    """Refuse data files that resolve (symlinks followed) outside the header's folder."""
    folder = path.parent.resolve()
    for name in names:
        target = (path.parent / name).resolve()
        if not target.is_relative_to(folder):
            raise ImageReadError(
                f"the header names the data file {name!r}, which resolves to {target}, outside the header's "
                f"folder {folder}",
                path=path,
                fix="put the data file beside the header, or pass allow_external_data=True if you trust this header",
            )


def _stored_bytes(path: Path, layout: _DataLayout) -> tuple[int, str]:
    """Bytes available to the voxels (after the header or the skipped bytes), and where, for messages."""
    skip = max(layout.skip, 0)
    if not layout.data_files:
        return max(path.stat().st_size - layout.header_bytes - skip, 0), "the file"
    total = 0
    for name in layout.data_files:
        target = path.parent / name
        if not target.is_file():
            raise ImageReadError(
                f"the data file {name!r} named by the header is missing ({target})",
                path=path,
                fix="put the data file where the header says, or correct the header's data file field",
            )
        total += max(target.stat().st_size - skip, 0)
    n = len(layout.data_files)
    return total, "its data file" if n == 1 else f"its {n} data files"


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
