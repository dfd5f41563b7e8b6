"""Write volumes atomically (temp file in the same folder, then rename): nothing half-written survives a kill."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np


def atomic_write(path: Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temporary path next to ``path``, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes)  # keep .nii.gz so writers pick the right format
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def save_nifti(array: np.ndarray, affine: np.ndarray, path: Path, dtype: type | None = None) -> Path:
    """Save ``array`` (I, J, K[, C]) with a RAS ``affine`` as NIfTI, atomically."""
    data = np.asarray(array, dtype=dtype) if dtype is not None else np.asarray(array)
    img = nib.Nifti1Image(data, np.asarray(affine, dtype=float))
    img.header.set_xyzt_units("mm", "sec")
    img.set_sform(np.asarray(affine, dtype=float), code=1)
    img.set_qform(np.asarray(affine, dtype=float), code=1)
    return atomic_write(Path(path), lambda tmp: nib.save(img, str(tmp)))
