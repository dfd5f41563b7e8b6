"""The one place files are written: atomically (temp file in the same folder, then rename), so a kill
never leaves a half-written file, and deterministically, so the same data gives the same bytes."""

from __future__ import annotations

import gzip
import hashlib
import os
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np


def _default_mode() -> int:
    """The permissions ``open()`` would give a new file (0666 minus the umask); mkstemp gives 0600."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


_FILE_MODE = _default_mode()


def atomic_write_bytes(path: Path, data: bytes, *, fsync: bool = False) -> Path:
    """Write ``data`` to a hidden temporary file next to ``path``, then ``os.replace`` it into place.

    Args:
        fsync: flush to disk before the rename (for small files whose loss would matter, e.g. manifests).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, _FILE_MODE)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            if fsync:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def mark_output_folder(folder: Path) -> Path:
    """Mark ``folder`` as medhybrid's own output, so that a folder walk never reads it back as input
    (:data:`medhybrid.io.dicom_files.OUTPUT_MARKER`)."""
    from medhybrid.io.dicom_files import OUTPUT_MARKER

    return atomic_write_bytes(Path(folder) / OUTPUT_MARKER, b"written by medhybrid: not an input\n")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """SHA-256 of a file's bytes, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def nifti_bytes(
    array: np.ndarray,
    affine: np.ndarray,
    *,
    description: str = "",
    compresslevel: int = 6,
    slope: float | None = None,
) -> bytes:
    """A ``.nii.gz`` file's bytes, deterministic: gzip with mtime 0 and no file name.

    ``array`` is stored with its own dtype; ``affine`` (RAS) goes to both sform and qform (qform only if
    it has no shear, which NIfTI's qform cannot express). ``slope`` sets ``scl_slope`` (readers see
    ``stored * slope``), e.g. ``1 / 255`` for a [0, 1] map stored as uint8.
    """
    affine = np.asarray(affine, dtype=float)
    img = nib.Nifti1Image(np.asarray(array), affine)
    img.header.set_data_dtype(np.asarray(array).dtype)
    img.header.set_xyzt_units("mm", "sec")
    img.header.set_sform(affine, code=1)
    try:
        img.header.set_qform(affine, code=1, strip_shears=False)
    except nib.spatialimages.HeaderDataError:
        img.header.set_qform(affine, code=0)  # sheared: the sform carries the geometry
    if slope is not None:
        img.header.set_slope_inter(slope, 0.0)
    if description:
        img.header["descrip"] = description.encode("ascii", "replace")[:79]
    return gzip.compress(img.to_bytes(), compresslevel=compresslevel, mtime=0)


def save_nifti(array: np.ndarray, affine: np.ndarray, path: Path, dtype: type | None = None) -> Path:
    """Save ``array`` (I, J, K[, C]) with a RAS ``affine`` as ``.nii.gz``, atomically and deterministically."""
    data = np.asarray(array, dtype=dtype) if dtype is not None else np.asarray(array)
    if not str(path).endswith(".nii.gz"):
        raise ValueError(f"save_nifti writes .nii.gz files, got {path}")
    return atomic_write_bytes(Path(path), nifti_bytes(data, affine))
