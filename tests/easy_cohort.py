"""A trivially separable cohort for tests that need a model that really works: noise images, half of them
with one bright square (the lesion, and its exact mask) at a random place. A tiny hybrid learns it in a
few seconds, so tests can assert real accuracy and real mask placement."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medhybrid.io.manifest import ManifestRow, write_manifest
from medhybrid.io.writers import nifti_bytes

SIZE = 48
SIDE = 12
SPLITS = (("train", 0.5), ("val", 0.25), ("test", 0.25))


def write_easy_cohort(folder: Path, n: int = 40, seed: int = 0, patients: bool = False) -> Path:
    """``n`` 2D studies (``SIZE`` x ``SIZE``, 1 mm, NIfTI) under ``folder``; returns the manifest path.

    Labels alternate (even: normal, odd: a ``SIDE`` x ``SIDE`` square of +1 on N(0, 0.1) noise); splits
    take consecutive blocks of pairs, so every split has both classes. ``patients``: studies ``2p`` and
    ``2p + 1`` belong to patient ``p``, and a patient's studies share a split.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    bounds = np.cumsum([0.0] + [f for _, f in SPLITS]) * (n // 2)
    rows = []
    for i in range(n):
        image = rng.normal(0.0, 0.1, (SIZE, SIZE)).astype(np.float32)
        mask = np.zeros((SIZE, SIZE), np.uint8)
        label = i % 2
        if label:
            x, y = rng.integers(2, SIZE - SIDE - 2, 2)
            mask[x : x + SIDE, y : y + SIDE] = 1
            image[mask > 0] += 1.0
        sid = f"easy_{i:03d}"
        (folder / f"{sid}.nii.gz").write_bytes(nifti_bytes(image[..., None], np.eye(4)))
        (folder / f"{sid}_mask.nii.gz").write_bytes(nifti_bytes(mask[..., None], np.eye(4)))
        split = SPLITS[int(np.searchsorted(bounds, i // 2, side="right")) - 1][0]
        rows.append(
            ManifestRow(
                sid,
                folder / f"{sid}.nii.gz",
                label,
                folder / f"{sid}_mask.nii.gz",
                split,
                patient_id=f"p{i // 2}" if patients else None,
            )
        )
    sidecar = {
        "label_names": {"0": "normal", "1": "abnormal"},
        "mask_label_names": {"0": "background", "1": "lesion"},
        "mask_kind": "lesion",
        "task": "multitask",
    }
    return write_manifest(folder / "manifest.csv", rows, sidecar=sidecar, sort=False)


def easy_pipeline(manifest: Path, *, task: str = "multitask", epochs: int = 6, **data: object) -> dict:
    """A tiny 2D hybrid pipeline that learns the easy cohort in seconds."""
    metrics = {"multitask": ["auroc", "dice", "loss"], "segmentation": ["dice", "loss"]}[task]
    return {
        "name": f"easy_{task}",
        "data": {
            "manifest": str(manifest),
            "task": task,
            "spatial_dims": 2,
            "intensity": "none",
            "spatial_size": [SIZE, SIZE],
            "augment": {"flip_prob": 0.0},
            **data,
        },
        # The pooled-CNN path on (off by default): these runs take 3 optimiser steps an epoch, and in 24
        # steps the CLS token alone had not learnt the squares (3-fold CV of the cohort: AUROC per fold
        # 1.0, 0.08, 0.0 without it, 1.0, 1.0, 1.0 with it). The tests here are about the machinery.
        "model": {"name": "hybrid_tiny_2d", "args": {"img_size": [SIZE, SIZE], "fuse_pooled": True}},
        "train": {"batch_size": 4, "stages": [{"epochs": epochs, "lr": 0.01, "warmup_epochs": 1}]},
        # select on Dice: AUROC reaches 1.0 in the first epoch here and would pick an untrained decoder
        "eval": {"metrics": metrics, "select": "dice"},
        "runtime": {"seed": 0, "threads": 2},
    }
