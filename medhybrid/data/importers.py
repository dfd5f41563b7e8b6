"""Turn public data sets into manifests (see ``docs/manifests.md``).

* :func:`import_medmnist`: a MedMNIST ``.npz`` to one file per sample (PNG for 2D, NIfTI for 3D) plus
  ``manifest.csv`` and its sidecar. The files read back with :func:`~medhybrid.io.readers.read_image`
  to exactly the array of :func:`~medhybrid.io.readers.medmnist_study` (grey-level images; see the note
  on RGB below). Output is byte-identical from run to run.
* :func:`import_msd`: a Medical Segmentation Decathlon task folder (``dataset.json``) to a manifest that
  points at the original files, with a deterministic train/val split.
"""

from __future__ import annotations

import io
import json
import logging
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from medhybrid.errors import ConfigError, ImageReadError, InputError
from medhybrid.io.manifest import ManifestRow, write_manifest
from medhybrid.io.readers import read_medmnist
from medhybrid.io.writers import atomic_write_bytes, nifti_bytes

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.csv"
# Class names of the MedMNIST data sets we know (keys: the npz stem without ``_trainval``).
MEDMNIST_LABEL_NAMES: dict[str, dict[int, str]] = {
    "pneumoniamnist": {0: "normal", 1: "pneumonia"},
    "adrenalmnist3d": {0: "normal", 1: "hyperplasia"},
    "adrenalmnist3d_64": {0: "normal", 1: "hyperplasia"},
}
NIFTI_GZIP_LEVEL = 1  # nibabel's default for .nii.gz: fast, and the volumes are small
_WRITE_BATCH = 256  # samples handed to the thread pool at a time (bounds memory)


# --- MedMNIST ------------------------------------------------------------------------------------


def medmnist_name(npz: Path) -> str:
    """The data set name of a MedMNIST archive: its stem without a trailing ``_trainval``."""
    stem = Path(npz).name.removesuffix(".npz")
    return stem.removesuffix("_trainval")


def medmnist_label_names(name: str, labels: np.ndarray) -> dict[int, str]:
    """Known class names for ``name``, else ``class_<i>`` for 0..max(label)."""
    if name in MEDMNIST_LABEL_NAMES:
        return dict(MEDMNIST_LABEL_NAMES[name])
    top = int(labels.max()) if labels.size else 0
    return {i: f"class_{i}" for i in range(top + 1)}


def import_medmnist(npz: Path, out: Path, *, progress: Callable[[], None] | None = None) -> Path:
    """Write every sample of every split of a MedMNIST archive as a file, plus a manifest.

    2D grey images become 8-bit PNGs, 2D RGB images RGB PNGs, 3D volumes uint8 NIfTI (``.nii.gz``,
    identity affine, 1 mm), under ``out/images/<split>/<name>_<split>_<index:05d>.<ext>``. The
    manifest ``out/manifest.csv`` (study_id = the file stem, label from the archive, no mask) and its
    sidecar ``out/manifest.json`` (label names, task classification) are written last. Every file is
    written atomically; running twice gives byte-identical output.

    Args:
        progress: called once per sample written.

    Returns:
        the manifest path.

    Raises:
        ImageReadError: the archive is not a MedMNIST file, or its images are not 8-bit.
    """
    npz = Path(npz)
    out = Path(out)
    name = medmnist_name(npz)
    splits = read_medmnist(npz)
    rows: list[ManifestRow] = []
    all_labels = []
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        for split, (images, labels) in splits.items():
            kind = _medmnist_kind(images, npz)
            folder = out / "images" / split
            folder.mkdir(parents=True, exist_ok=True)
            suffix = ".nii.gz" if kind == "3d" else ".png"
            encode = _encode_nifti if kind == "3d" else _encode_png
            for start, stop in _batches(len(images), _WRITE_BATCH):
                block = np.asarray(images[start:stop])  # one slice of the (possibly lazy) array
                jobs = []
                for offset in range(stop - start):
                    index = start + offset
                    study_id = f"{name}_{split}_{index:05d}"
                    target = folder / f"{study_id}{suffix}"
                    jobs.append(pool.submit(_write_sample, encode, block[offset], target))
                    rows.append(ManifestRow(study_id, target, int(labels[index]), None, split))
                for job in jobs:
                    job.result()
                    if progress is not None:
                        progress()
            all_labels.append(np.asarray(labels).reshape(-1))
            logger.info("%s %s: wrote %d %s files to %s", name, split, len(images), suffix, folder)
    label_names = medmnist_label_names(name, np.concatenate(all_labels))
    sidecar = {
        "label_names": {str(k): v for k, v in label_names.items()},
        "task": "classification",
        "source": f"MedMNIST {name} ({npz.name})",
    }
    return write_manifest(out / MANIFEST_NAME, rows, sidecar=sidecar)


def _medmnist_kind(images: np.ndarray, npz: Path) -> str:
    """``2d``, ``rgb`` or ``3d`` with the same rule as :func:`~medhybrid.io.readers.medmnist_study`."""
    if images.dtype != np.uint8:
        raise ImageReadError(f"images are {images.dtype}, expected uint8", path=npz, fix="give a MedMNIST file")
    if images.ndim == 3:
        return "2d"
    if images.ndim == 4 and images.shape[-1] == 3 and images.shape[1] != 3:
        return "rgb"
    if images.ndim == 4:
        return "3d"
    raise ImageReadError(f"images of shape {images.shape} are neither 2D nor 3D", path=npz)


def _batches(n: int, size: int) -> Iterator[tuple[int, int]]:
    for start in range(0, n, size):
        yield start, min(start + size, n)


def _write_sample(encode: Callable[[np.ndarray], bytes], sample: np.ndarray, target: Path) -> None:
    atomic_write_bytes(target, encode(sample))


def _encode_png(sample: np.ndarray) -> bytes:
    """PNG bytes of a (H, W) grey or (H, W, 3) RGB sample.

    PIL arrays are (rows, cols) and ``read_image`` transposes them to (i=column, j=row), which is what
    ``medmnist_study`` does with ``sample.T``: writing the sample as-is round-trips exactly.
    """
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(sample)).save(buf, format="PNG")
    return buf.getvalue()


def _encode_nifti(sample: np.ndarray) -> bytes:
    """Deterministic ``.nii.gz`` bytes of a 3D sample stored as ``sample.T`` (medmnist_study's order).

    The gzip member gets mtime 0 and no file name (as nibabel's own DeterministicGzipFile does), so the
    bytes do not depend on when or under which temporary name they were written.
    """
    return nifti_bytes(np.ascontiguousarray(sample.T), np.eye(4), compresslevel=NIFTI_GZIP_LEVEL)


# --- Medical Segmentation Decathlon -----------------------------------------------------------------


def import_msd(
    dataset_dir: Path, out: Path, *, val_fraction: float = 0.2, seed: int = 0, mask_kind: str = "lesion"
) -> Path:
    """Write ``out/manifest.csv`` (+ sidecar) for the training cases of an MSD task folder.

    Images and masks are not copied: the manifest points at them (paths relative to ``out``). The
    study_id is the case file stem (``hippocampus_001``); labels are empty (segmentation). The split
    is deterministic: sorted case ids, permuted by ``numpy.random.default_rng(seed)``, the first
    ``round(val_fraction * N)`` are ``val``, the rest ``train``. Entries whose image or label file is
    missing are skipped with a warning. ``mask_kind`` (``lesion`` or ``anatomy``) goes into the sidecar:
    MSD tasks differ (Hippocampus labels anatomy, BrainTumour or Liver tumours lesions) and dataset.json
    does not say which.

    Returns:
        the manifest path.

    Raises:
        InputError: ``dataset.json`` is missing, unreadable or has no ``training`` list.
        ConfigError: ``val_fraction`` is not in [0, 1].
    """
    dataset_dir = Path(dataset_dir)
    out = Path(out)
    if not 0.0 <= val_fraction <= 1.0:
        raise ConfigError(f"val_fraction must be in [0, 1], got {val_fraction}", fix="e.g. --val-fraction 0.2")
    if mask_kind not in ("anatomy", "lesion"):
        raise ConfigError(f"mask_kind must be anatomy or lesion, got {mask_kind!r}", fix="--mask-kind anatomy")
    meta = _read_dataset_json(dataset_dir)
    cases: dict[str, tuple[Path, Path]] = {}
    for n, entry in enumerate(meta["training"]):
        case = _msd_case(entry, dataset_dir, n)
        if case is None:
            continue
        study_id, image, mask = case
        if study_id in cases:
            logger.warning("%s: training entry %d repeats case %s, skipped", dataset_dir, n, study_id)
            continue
        cases[study_id] = (image, mask)
    ids = sorted(cases)
    n_val = int(round(val_fraction * len(ids)))
    order = np.random.default_rng(seed).permutation(len(ids))
    val_ids = {ids[i] for i in order[:n_val]}
    rows = [
        ManifestRow(study_id, cases[study_id][0], None, cases[study_id][1], "val" if study_id in val_ids else "train")
        for study_id in ids
    ]
    names = meta.get("labels") or {}
    sidecar: dict[str, Any] = {
        "mask_label_names": {str(int(k)): str(v) for k, v in names.items()} if isinstance(names, dict) else {},
        "task": "segmentation",
        "mask_kind": mask_kind,
        "source": f"Medical Segmentation Decathlon: {meta.get('name', dataset_dir.name)}",
    }
    logger.info("%s: %d cases (%d train, %d val)", dataset_dir, len(ids), len(ids) - n_val, n_val)
    out.mkdir(parents=True, exist_ok=True)
    return write_manifest(out / MANIFEST_NAME, rows, sidecar=sidecar)


def _read_dataset_json(dataset_dir: Path) -> dict[str, Any]:
    path = dataset_dir / "dataset.json"
    if not path.is_file():
        raise InputError("no dataset.json", path=dataset_dir, fix="give an MSD task folder (dataset.json, imagesTr/)")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"cannot be read as JSON ({exc})", path=path, fix="repair the file") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("training"), list):
        raise InputError("no 'training' list", path=path, fix="give an MSD dataset.json")
    labels = meta.get("labels")
    if labels is not None and (
        not isinstance(labels, dict) or not all(str(k).strip().lstrip("-").isdigit() for k in labels)
    ):
        raise InputError(f"'labels' must map integers to names, got {labels!r}", path=path)
    return meta


def _msd_case(entry: Any, dataset_dir: Path, n: int) -> tuple[str, Path, Path] | None:
    """(study_id, image, label) of one ``training`` entry, or ``None`` (logged) if it is unusable."""
    if not isinstance(entry, dict) or not isinstance(entry.get("image"), str) or not entry.get("label"):
        logger.warning("%s: training entry %d has no image/label pair, skipped", dataset_dir, n)
        return None
    image = Path(os.path.normpath(dataset_dir.resolve() / entry["image"]))
    mask = Path(os.path.normpath(dataset_dir.resolve() / str(entry["label"])))
    for what, path in (("image", image), ("label", mask)):
        if not path.is_file():
            logger.warning("%s: %s file %s is missing, case skipped", dataset_dir, what, path)
            return None
    study_id = image.name
    for suffix in (".nii.gz", ".nii", ".nrrd", ".mha"):
        if study_id.lower().endswith(suffix):
            study_id = study_id[: -len(suffix)]
            break
    return study_id, image, mask
