"""Faithfulness of a saliency map: the deletion curve against random deletion.

Deletion (Petsiuk et al., 2018, "RISE"): remove the most salient voxels first, in growing fractions,
and follow the model's probability of abnormality; a map that points at what drives the prediction
makes it fall fast. The same fractions removed in random order give the reference curve. Written here
because MONAI has no deletion metric, and the model-specific parts (input grid, abnormality score) are
medhybrid's own.

- "Removed" voxels take the image's mean value per channel (after the model's intensity normalisation),
  so removal does not add new dark edges that the model could react to.
- Curves are divided by the probability on the intact image, so every study starts at 1 and studies
  weigh the same. The deletion AUC is the trapezoidal mean of that curve over the fractions 0..1.
- ``faithfulness = AUC(random) - AUC(saliency)``: 0 means the map is no better than chance; positive
  means the salient voxels matter more than random ones.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from medhybrid.evaluate import bootstrap as B

DEFAULT_STEPS = 10
DEFAULT_RANDOM_ORDERS = 3
BATCH = 16

ScoreFn = Callable[[torch.Tensor], torch.Tensor]


def deletion_inputs(x: torch.Tensor, order: torch.Tensor, fractions: np.ndarray) -> torch.Tensor:
    """``(len(fractions), C, *spatial)`` copies of ``x`` ``(1, C, *spatial)`` with the first
    ``round(f * N)`` voxels of ``order`` (flat spatial indices) set to the per-channel mean."""
    c = x.shape[1]
    flat = x.reshape(c, -1)
    fill = flat.mean(1, keepdim=True)
    out = flat.expand(len(fractions), c, flat.shape[1]).clone()
    n = flat.shape[1]
    for i, f in enumerate(fractions):
        k = int(round(float(f) * n))
        if k:
            out[i][:, order[:k]] = fill
    return out.reshape(len(fractions), *x.shape[1:])


@torch.no_grad()
def deletion_curve(score: ScoreFn, x: torch.Tensor, order: torch.Tensor, fractions: np.ndarray) -> np.ndarray:
    """The score after deleting each fraction of voxels in ``order`` (batched ``BATCH`` at a time)."""
    inputs = deletion_inputs(x, order, fractions)
    values = [score(inputs[i : i + BATCH]).float().cpu() for i in range(0, len(inputs), BATCH)]
    return torch.cat(values).numpy().astype(np.float64)


def area(curve: np.ndarray, fractions: np.ndarray) -> float:
    """Trapezoidal mean of ``curve`` over ``fractions`` (which span 0..1)."""
    return float(np.sum((curve[1:] + curve[:-1]) * np.diff(fractions)) / 2.0)


def deletion_scores(
    score: ScoreFn,
    x: torch.Tensor,
    maps: dict[str, torch.Tensor],
    *,
    steps: int = DEFAULT_STEPS,
    random_orders: int = DEFAULT_RANDOM_ORDERS,
    seed: int = 0,
) -> dict[str, dict[str, object]]:
    """Deletion curves of one study for each saliency map and for random order.

    Args:
        score: maps a batch ``(B, C, *spatial)`` to the probability of abnormality ``(B,)``.
        x: the preprocessed study ``(1, C, *spatial)``.
        maps: method -> saliency ``(1, *spatial)`` (or ``(*spatial)``) on the same grid as ``x``.

    Returns:
        ``{name: {"curve": [...], "auc": float}}`` for every method and ``random`` (mean of the random
        orders), curves normalised by the intact-image probability; plus each method's ``faithfulness``.
    """
    fractions = np.linspace(0.0, 1.0, steps + 1)
    n = int(np.prod(x.shape[2:]))
    gen = torch.Generator().manual_seed(seed)
    curves: dict[str, np.ndarray] = {}
    for name, sal in maps.items():
        flat = sal.reshape(-1).float()
        if flat.numel() != n:
            raise ValueError(f"saliency {name} has {flat.numel()} voxels, the input {n}")
        # ties (flat regions of a map) are broken at random, not by voxel index
        jitter = torch.rand(n, generator=gen) * 1e-6
        curves[name] = deletion_curve(score, x, torch.argsort(flat + jitter, descending=True), fractions)
    rand = [deletion_curve(score, x, torch.randperm(n, generator=gen), fractions) for _ in range(random_orders)]
    curves["random"] = np.mean(rand, axis=0)
    start = max(float(curves["random"][0]), 1e-6)
    out: dict[str, dict[str, object]] = {}
    for name, curve in curves.items():
        normed = curve / start
        out[name] = {"curve": [float(v) for v in normed], "auc": area(normed, fractions)}
    for name in maps:
        out[name]["faithfulness"] = float(out["random"]["auc"]) - float(out[name]["auc"])  # type: ignore[arg-type]
    return out


def faithfulness_summary(
    done: Sequence[dict[str, dict[str, Any]]], *, groups: Sequence[str] | None, n_boot: int, seed: int
) -> dict[str, Any]:
    """Mean deletion curve, deletion AUC and faithfulness (with CIs) per method over studies' results of
    :func:`deletion_scores` (``groups``: the studies' sampling units, for clustered CIs)."""
    if not done:
        return {}
    out: dict[str, Any] = {"n": len(done)}
    for name in done[0]:
        curves = np.asarray([d[name]["curve"] for d in done])
        entry: dict[str, Any] = {
            "mean_curve": curves.mean(0).tolist(),
            "auc": B.mean_ci(np.asarray([d[name]["auc"] for d in done]), groups=groups, n_boot=n_boot, seed=seed),
        }
        if name != "random":
            values = np.asarray([d[name]["faithfulness"] for d in done])
            entry["faithfulness"] = B.mean_ci(values, groups=groups, n_boot=n_boot, seed=seed)
        out[name] = entry
    return out
