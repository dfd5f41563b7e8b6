"""The arrays of the report viewer (:mod:`medhybrid.infer.viewer`) as the page embeds them: reduced by
integer block factors until they fit the page's budget, quantised to uint16 with a stated linear map, and
zlib-compressed into base64 data URIs (inflated by the browser's own ``DecompressionStream``)."""

from __future__ import annotations

import base64
import math
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

# base64 characters of embedded arrays per page: with the key-slice PNGs and tables the page stays < 20 MB
VIEWER_BUDGET = 15_000_000
# The best zlib ratio assumed before trying a resolution: a candidate beyond it is skipped without compressing.
BEST_RATIO = 8.0
# Saliency is embedded on a grid this much coarser (per axis) than the volume's: it is smooth (a Grad-CAM map
# has the resolution of the encoder's last stage), so the volume keeps the budget.
SALIENCY_STEP = 2
ZLIB_URI = "data:application/zlib;base64,"  # RFC 6713


@dataclass(frozen=True)
class Embedded:
    """The arrays as the page holds them, on a grid reduced by ``factors`` (display-frame axes)."""

    factors: tuple[int, int, int]
    shape: tuple[int, int, int]
    integral: bool  # the source values are integers (slope 1 is then exact, block means rounded to 1)
    slope: float
    intercept: float
    payload: dict[str, str]  # "image", "mask", saliency method -> data URI of zlib data
    grids: dict[str, dict[str, list[int]]]  # the same names -> their "shape", and "step": shown voxels per voxel

    @property
    def chars(self) -> int:
        return sum(len(v) for v in self.payload.values())


def block_reduce(array: np.ndarray, factors: Sequence[int], how: str = "mean") -> np.ndarray:
    """``(X, Y, Z)`` -> ``(ceil(X / fx), ...)``: each block's mean (float32) or max (dtype kept); edge blocks
    are partial. Works one block of slices at a time along the array's outermost axis in memory (contiguous
    reads), so a large float volume is never copied whole."""
    ufunc = np.add if how == "mean" else np.maximum
    outer = int(np.argmax(np.abs(array.strides)))
    moved = np.moveaxis(array, outer, 0)
    f = [int(factors[outer])] + [int(factors[a]) for a in range(3) if a != outer]
    starts = [np.arange(0, n, fa) for n, fa in zip(moved.shape, f, strict=True)]
    out = np.empty(tuple(len(s) for s in starts), dtype=np.float32 if how == "mean" else array.dtype)
    for k, s0 in enumerate(starts[0]):
        chunk = moved[s0 : s0 + f[0]]
        plane = ufunc.reduce(chunk.astype(np.float32) if how == "mean" else chunk, axis=0)
        out[k] = ufunc.reduceat(ufunc.reduceat(plane, starts[1], axis=0), starts[2], axis=1)
    if how == "mean" and any(fa > 1 for fa in f):
        counts = [np.diff(np.append(s, n)).astype(np.float32) for s, n in zip(starts, moved.shape, strict=True)]
        out /= counts[0][:, None, None] * counts[1][None, :, None] * counts[2][None, None, :]
    return np.moveaxis(out, 0, outer)


def candidate_factors(shape: Sequence[int], spacing: Sequence[float]) -> Iterator[tuple[int, int, int]]:
    """Block factors from none upward, one axis a step at a time: the axis whose reduced voxel is the
    smallest (in mm; ties: the longest), so a volume is reduced in-plane first and stays near isotropic."""
    f = [1, 1, 1]
    yield (1, 1, 1)
    while any(f[a] < shape[a] for a in range(3)):
        a = min((a for a in range(3) if f[a] < shape[a]), key=lambda a: (spacing[a] * f[a], -shape[a] / f[a]))
        f[a] += 1
        yield (f[0], f[1], f[2])


def _is_integral(volume: np.ndarray) -> bool:
    outer = np.moveaxis(volume, int(np.argmax(np.abs(volume.strides))), 0)
    return all(np.array_equal(np.rint(plane), plane) for plane in outer)


def quantise(values: np.ndarray, integral: bool) -> tuple[np.ndarray, float, float]:
    """uint16 ``q`` with ``value = q * slope + intercept``: slope 1 (exact) for integer data that fits,
    else 65,535 steps over the value range."""
    values = np.nan_to_num(values, copy=False)
    lo, hi = float(values.min()), float(values.max())
    slope = 1.0 if integral and hi - lo <= 65535 else ((hi - lo) / 65535 or 1.0)
    q = np.clip(np.rint((values - lo) / slope), 0, 65535).astype(np.uint16)
    return q, slope, lo


def _pack(array: np.ndarray) -> str:
    """``(X, Y, Z)`` array, x fastest, zlib (level 1: fast, and most of the gain), as a base64 data URI (the
    form of the page's PNGs, which tools that look inside pages, such as the PHI audit, already decode)."""
    flat = np.ascontiguousarray(array.transpose(2, 1, 0)).ravel()
    if flat.dtype == np.uint16:  # low bytes, then high bytes: the high-byte plane compresses to almost nothing
        flat = np.concatenate([(flat & 0xFF).astype(np.uint8), (flat >> 8).astype(np.uint8)])
    return ZLIB_URI + base64.b64encode(zlib.compress(flat.tobytes(), 1)).decode("ascii")


def _embed(
    volume: np.ndarray,
    labels: np.ndarray | None,
    saliency: Mapping[str, np.ndarray],
    factors: tuple[int, int, int],
    integral: bool,
) -> tuple[Embedded, np.ndarray]:
    reduced = block_reduce(volume, factors)
    q, slope, intercept = quantise(reduced, integral)
    shape = (int(q.shape[0]), int(q.shape[1]), int(q.shape[2]))
    payload = {"image": _pack(q)}
    grids = {"image": {"shape": list(shape), "step": [1, 1, 1]}}
    if labels is not None:
        payload["mask"] = _pack(block_reduce(labels.astype(np.uint8, copy=False), factors, "max"))
        grids["mask"] = grids["image"]
    steps = [SALIENCY_STEP if f * SALIENCY_STEP <= n else 1 for n, f in zip(volume.shape, factors, strict=True)]
    coarse = [f * st for f, st in zip(factors, steps, strict=True)]
    for method, values in saliency.items():
        grid = np.clip(np.rint(block_reduce(values, coarse)), 0, 255).astype(np.uint8)
        payload[method] = _pack(grid)
        grids[method] = {"shape": list(grid.shape), "step": steps}
    return Embedded(factors, shape, integral, slope, intercept, payload, grids), reduced


def fit_budget(
    volume: np.ndarray,
    labels: np.ndarray | None,
    saliency: Mapping[str, np.ndarray],
    spacing: Sequence[float],
    budget: int = VIEWER_BUDGET,
) -> tuple[Embedded, np.ndarray]:
    """The finest block factors whose embedded arrays fit ``budget`` base64 characters.

    Args:
        volume: display-frame ``(X, Y, Z)`` values (float).
        labels, saliency: display-frame uint8 maps of the same shape.

    Returns:
        The embedded arrays and the reduced volume (float32, real values) they were quantised from.
    """
    integral = _is_integral(volume)
    per_voxel = 2 + (labels is not None) + len(saliency) / SALIENCY_STEP**3
    max_voxels = budget * BEST_RATIO * 0.75 / per_voxel
    for factors in candidate_factors(volume.shape, spacing):
        voxels = math.prod(-(-n // f) for n, f in zip(volume.shape, factors, strict=True))
        if voxels > max_voxels and voxels > 1:
            continue
        embedded, reduced = _embed(volume, labels, saliency, factors, integral)
        if embedded.chars <= budget or voxels == 1:
            return embedded, reduced
        # the ratio just seen holds roughly at the next resolutions: skip those that cannot fit either
        max_voxels = min(max_voxels, 0.95 * voxels * budget / embedded.chars)
    raise AssertionError("unreachable: the last candidate is a single voxel")
