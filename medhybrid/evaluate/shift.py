"""Acquisition-shift suite: how much AUROC a model loses when the same studies are acquired differently.

Each shift changes the image as loaded (before preprocessing), as another scanner or protocol would:

================  ==========================================================================================
``contrast``      intensities pulled 40 % towards the study's mean (a flatter reconstruction kernel / window)
``gamma``         gamma 1.5 on the study's own intensity range (MONAI ``AdjustContrast``: a different
                  detector response or tone curve)
``blur``          Gaussian blur, sigma 1 voxel along every in-image axis (a softer kernel / motion)
``noise``         additive Gaussian noise, sd 5 % of the study's 1-99th percentile range, seeded per study
                  (lower dose / fewer averages)
``resolution``    downsampled to half the voxels along every in-image axis (area) and back (linear)
                  (a lower-resolution acquisition)
================  ==========================================================================================

Axes of length 1 (a 2D image stored as ``(I, J, 1)``) are left alone. A linear intensity change such as
``contrast`` is undone by a per-image min-max or z-score preprocessing step; it is kept in the suite so
that a pipeline whose normalisation does not undo it shows the cost.

:func:`run_shift_suite` evaluates the clean split and each shift with :func:`~medhybrid.evaluate.runner.evaluate`
(the calibration split stays clean, so the temperature and threshold are the clean run's), and reports
per shift the AUROC and the drop ``AUROC(clean) - AUROC(shifted)`` with a paired bootstrap CI over the
same studies (:func:`~medhybrid.evaluate.bootstrap.paired_auroc_delta`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.transforms import AdjustContrast, Resize
from scipy.ndimage import gaussian_filter

from medhybrid.errors import ConfigError
from medhybrid.io.study import Study

SHIFTS = ("contrast", "gamma", "blur", "noise", "resolution")
SHIFT_FILE = "shift.json"


def _spatial(array: np.ndarray) -> np.ndarray:
    """``(C, I, J, K)`` view of a ``(I, J, K)`` or ``(I, J, K, C)`` study array."""
    return array[None] if array.ndim == 3 else np.moveaxis(array, -1, 0)


def _back(chw: np.ndarray, like: np.ndarray) -> np.ndarray:
    out = chw[0] if like.ndim == 3 else np.moveaxis(chw, 0, -1)
    return np.ascontiguousarray(out, dtype=np.float32)


def _seed(key: str, seed: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "little")


def check_shift(name: str) -> None:
    """Raises: ConfigError: ``name`` is not one of :data:`SHIFTS`."""
    if name not in SHIFTS:
        raise ConfigError(f"unknown acquisition shift {name!r}", fix=f"use one of {', '.join(SHIFTS)}")


def shift_array(array: np.ndarray, name: str, *, key: str = "", seed: int = 0) -> np.ndarray:
    """``array`` (a study's ``(I, J, K[, C])`` voxels) under shift ``name`` (see the module docstring).

    Raises:
        ConfigError: an unknown shift name.
    """
    check_shift(name)
    x = _spatial(np.asarray(array, dtype=np.float32))
    in_image = [ax for ax in range(1, 4) if x.shape[ax] > 1]
    if name == "contrast":
        # a linear map: no library call is simpler than the formula
        mean = x.mean(axis=tuple(range(1, 4)), keepdims=True)
        y = mean + 0.6 * (x - mean)
    elif name == "gamma":
        y = np.asarray(AdjustContrast(gamma=1.5)(x))
    elif name == "blur":
        sigma = [0.0] + [1.0 if ax in in_image else 0.0 for ax in range(1, 4)]
        y = gaussian_filter(x, sigma=sigma, mode="nearest")
    elif name == "noise":
        lo, hi = np.percentile(x, [1, 99])
        rng = np.random.default_rng(_seed(key, seed))
        y = x + rng.normal(0.0, 0.05 * float(hi - lo), size=x.shape).astype(np.float32)
    else:  # resolution
        full = x.shape[1:]
        half = tuple(max(1, s // 2) if ax + 1 in in_image else s for ax, s in enumerate(full))
        down = Resize(half, mode="area")(torch.from_numpy(x))
        y = np.asarray(Resize(full, mode="trilinear")(torch.as_tensor(down)))
    return _back(np.asarray(y, dtype=np.float32), array)


def shift_study(study: Study, name: str, seed: int = 0) -> Study:
    """A copy of ``study`` acquired under shift ``name`` (same geometry and metadata)."""
    return dataclasses.replace(study, array=shift_array(study.array, name, key=study.key, seed=seed))


def run_shift_suite(
    model: Path,
    manifest: Path,
    out: Path,
    options: Any,
    shifts: Sequence[str] = SHIFTS,
    on_study: Callable[[Any], None] | None = None,
    clean: Any = None,
) -> dict[str, Any]:
    """Evaluate ``options.split`` clean and under each shift into ``out/<name>/``; write ``out/shift.json``.

    ``clean``: an :class:`~medhybrid.evaluate.runner.EvaluateResult` of the same model, manifest and
    options already at hand (``medhybrid evaluate`` passes its own), used instead of evaluating again.

    Returns:
        ``{"split", "clean": {"auroc"}, "shifts": {name: {"auroc", "drop", "drop_ci_low", "drop_ci_high"}},
        "max_drop", "n"}``: the drop is clean minus shifted (positive: the shift costs AUROC).

    Raises:
        ConfigError: an unknown shift, or a model that does not classify.
    """
    from medhybrid.evaluate.bootstrap import paired_auroc_delta
    from medhybrid.evaluate.runner import evaluate

    for name in shifts:  # before any evaluation runs
        check_shift(name)
    out = Path(out)
    quiet = dataclasses.replace(options, saliency=False, report=False, store_calibration=False)
    if clean is None:
        clean = evaluate(model, manifest, out / "clean", quiet, on_study=on_study)
    if "classification" not in clean.metrics:
        raise ConfigError("the shift suite scores AUROC: the model does not classify")
    base = {r.study_id: r for r in clean.records if r.status == "ok" and r.label is not None}
    summary: dict[str, Any] = {
        "split": options.split,
        "clean": {"auroc": clean.metrics["classification"]["auroc"]["value"]},
        "shifts": {},
        "n": len(base),
    }
    for name in shifts:
        res = evaluate(model, manifest, out / name, dataclasses.replace(quiet, shift=name), on_study=on_study)
        shifted = {r.study_id: r for r in res.records if r.status == "ok"}
        ids = [i for i in base if i in shifted]
        labels = np.array([base[i].label for i in ids])
        a = np.array([base[i].score for i in ids], dtype=float)
        b = np.array([shifted[i].score for i in ids], dtype=float)
        delta = paired_auroc_delta(labels, a, b, n_boot=options.n_boot, seed=options.seed)
        summary["shifts"][name] = {
            "auroc": res.metrics["classification"]["auroc"]["value"],
            "drop": delta["value"],
            "drop_ci_low": delta["ci_low"],
            "drop_ci_high": delta["ci_high"],
            "n": len(ids),
        }
    summary["max_drop"] = max(s["drop"] for s in summary["shifts"].values()) if summary["shifts"] else None
    tmp = out / (SHIFT_FILE + ".tmp")
    tmp.write_text(json.dumps(summary, indent=2))
    tmp.replace(out / SHIFT_FILE)
    return summary
