"""Model-space outputs back onto the scan's own voxel grid, a slab of slices at a time.

The model sees the study after orientation, resampling and crop/pad; its outputs carry the affine of
that grid. Every native voxel ``(i, j, k)`` is mapped through ``inv(model_affine) @ native_affine`` into
the model grid and sampled there (``torch.nn.functional.grid_sample``).

Written here rather than with MONAI's ``SpatialResample``/``Invertd`` because those resample the whole
output volume at once in float32 for every channel: a two-class probability map of a 512 x 512 x 400 CT
is 840 MB before the argmax. Sampling ``slab`` native slices at a time and reducing each slab at once
(argmax to uint8 labels, or saliency to uint8) keeps the extra memory to a few tens of MB whatever
the scan size, and the result is the same voxel for voxel.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

# Native voxels sampled per slab: bounds the grid (3 floats) and the sampled channels per voxel.
SLAB_VOXELS = 1 << 20


def lift_affine(affine: np.ndarray | torch.Tensor) -> np.ndarray:
    """A 4x4 float64 affine from a 4x4 or a 2D (3x3) one; a 2D affine gets an identity third axis."""
    a = np.asarray(affine.detach().cpu() if isinstance(affine, torch.Tensor) else affine, dtype=np.float64)
    if a.shape == (4, 4):
        return a
    if a.shape == (3, 3):
        out = np.eye(4)
        out[:2, :2], out[:2, 3] = a[:2, :2], a[:2, 2]
        return out
    raise ValueError(f"expected a 3x3 or 4x4 affine, got shape {a.shape}")


def to_native(
    volume: torch.Tensor,
    model_affine: np.ndarray | torch.Tensor,
    native_affine: np.ndarray,
    native_shape: tuple[int, int, int],
    reduce: Callable[[torch.Tensor], torch.Tensor],
    *,
    mode: str = "bilinear",
    dtype: type = np.uint8,
) -> np.ndarray:
    """Resample ``volume`` (``(C, *spatial)``, 2 or 3 spatial axes) onto the native grid.

    Args:
        model_affine: voxel-to-RAS affine of ``volume``'s grid (4x4, or 3x3 for 2D).
        native_affine, native_shape: the scan's 4x4 affine and ``(I, J, K)``.
        reduce: maps a sampled slab ``(C, I, J, k)`` to ``(I, J, k)`` values (e.g. argmax); applied slab
            by slab.
        mode: ``bilinear`` (trilinear in 3D) or ``nearest``. A native voxel whose centre lies outside the
            model grid's field of view (beyond half a voxel from its outer voxel centres) reads 0; inside
            it, samples near the edge take the edge value.
        dtype: output dtype.

    Returns:
        ``(I, J, K)`` array of ``dtype``.
    """
    vol = volume.detach().float()
    if vol.ndim == 3:  # (C, H, W): a 2D grid becomes one slice thick
        vol = vol[..., None]
    if vol.ndim != 4:
        raise ValueError(f"expected (C, *spatial) with 2 or 3 spatial axes, got {tuple(volume.shape)}")
    src_shape = vol.shape[1:]
    # native voxel -> model voxel
    m = np.linalg.inv(lift_affine(model_affine)) @ np.asarray(native_affine, dtype=np.float64)
    m_t = torch.as_tensor(m[:3], dtype=torch.float32)
    size = torch.tensor(src_shape, dtype=torch.float32)
    # normalised coordinates for align_corners=True: -1 at voxel 0, +1 at voxel (n - 1)
    scale = torch.where(size > 1, 2.0 / (size - 1).clamp(min=1), torch.zeros_like(size))
    ni, nj, nk = native_shape
    out: np.ndarray = np.empty((ni, nj, nk), dtype=dtype)
    slab = max(1, SLAB_VOXELS // max(ni * nj, 1))
    ii, jj = torch.meshgrid(torch.arange(ni, dtype=torch.float32), torch.arange(nj, dtype=torch.float32), indexing="ij")
    inp = vol[None]  # (1, C, D=src0, H=src1, W=src2)
    for k0 in range(0, nk, slab):
        k1 = min(nk, k0 + slab)
        shape = (ni, nj, k1 - k0)
        kk = torch.arange(k0, k1, dtype=torch.float32)
        # model voxel coordinates of every native voxel in the slab: (I, J, k, 3)
        src = (
            ii[..., None, None] * m_t[:, 0]
            + jj[..., None, None] * m_t[:, 1]
            + kk[None, None, :, None] * m_t[:, 2]
            + m_t[:, 3]
        ).expand(*shape, 3)
        inside = ((src >= -0.5) & (src <= size - 0.5)).all(-1)
        # grid_sample's last grid axis is (x, y, z) = (W, H, D): reverse our (src0, src1, src2)
        grid = (src * scale - (scale > 0).float()).flip(-1)[None]
        sampled = F.grid_sample(inp, grid, mode=mode, padding_mode="border", align_corners=True)[0]
        sampled *= inside
        out[:, :, k0:k1] = reduce(sampled).cpu().numpy().astype(dtype, copy=False)
    return out


def argmax_labels(probs: torch.Tensor) -> torch.Tensor:
    """Class index per voxel (0 where every channel is 0, i.e. outside the model's field of view)."""
    return probs.argmax(0).to(torch.uint8)


def to_uint8(values: torch.Tensor) -> torch.Tensor:
    """A one-channel map in [0, 1] as 0..255."""
    return (values[0].clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)
