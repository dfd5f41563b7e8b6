"""What a mask label means, and the study-level score of a segmentation-only model.

Every foreground label of a mask has a **kind**, declared in the pipeline (``data.mask_kind``) or the
manifest sidecar (``mask_kind``, with per-label overrides in ``mask_label_kinds``), stored in the
checkpoint and used by every output:

- ``lesion``: an abnormality. Its volume is reported as a lesion, the SEG codes it as a Morphologically
  Abnormal Structure, and a segmentation-only model derives a study score from it (below) with an
  operating point fitted on validation like a classifier's.
- ``anatomy``: a normal structure (hippocampus, liver, ...). Its volume is reported as a structure, the
  SEG codes it as an Anatomical Structure, and it never makes a study "abnormal": a model whose labels are
  all anatomy gives no abnormality verdict at all.

Study score of a segmentation-only lesion model (:func:`lesion_score`): the connected components of the
voxels whose most likely class is a lesion label are found on the model's grid (full connectivity);
components smaller than ``min_ml`` are dropped; the score is the largest mean lesion probability
(summed over the lesion classes) of any remaining component, and 0 when none remains. It ranks studies
by the confidence of their most convincing lesion, not by the single most confident voxel (which is
near 1 in almost every scan), and it is not a calibrated probability.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np
import torch
from scipy import ndimage

MaskKind = Literal["anatomy", "lesion"]
MASK_KINDS: tuple[str, ...] = ("anatomy", "lesion")
DEFAULT_MASK_KIND: MaskKind = "lesion"
LESION_SCORE_METHOD = "max over lesion components of the mean lesion probability"


def resolve_mask_kinds(
    mask_label_names: Mapping[int, str],
    default: str | None = None,
    per_label: Mapping[int, str] | None = None,
) -> dict[int, str]:
    """Kind of every foreground label: ``per_label`` first, then ``default``, then ``lesion``.

    Raises:
        ValueError: an unknown kind, or a per-label kind for a label that has no name.
    """
    per_label = dict(per_label or {})
    unknown = sorted(k for k in per_label if k not in mask_label_names or k == 0)
    if unknown:
        raise ValueError(f"mask kinds given for labels {unknown} that are not foreground mask labels")
    out: dict[int, str] = {}
    for label in sorted(mask_label_names):
        if label == 0:
            continue
        kind = per_label.get(label, default or DEFAULT_MASK_KIND)
        if kind not in MASK_KINDS:
            raise ValueError(f"mask kind {kind!r} of label {label} is not one of {list(MASK_KINDS)}")
        out[label] = kind
    return out


def lesion_labels(kinds: Mapping[int, str]) -> list[int]:
    return sorted(k for k, v in kinds.items() if v == "lesion")


def lesion_score(
    seg_probs: torch.Tensor | np.ndarray, lesions: Sequence[int], voxel_ml: float, min_ml: float = 0.0
) -> float:
    """The study score of a segmentation-only model (see the module docstring).

    Args:
        seg_probs: ``(S, *spatial)`` class probabilities on the model's grid.
        lesions: the lesion labels (channels) among ``0..S-1``.
        voxel_ml: volume of one model-grid voxel in mL.
        min_ml: components below this volume do not count.
    """
    probs = seg_probs.detach().float().cpu().numpy() if isinstance(seg_probs, torch.Tensor) else seg_probs
    if not lesions:
        return 0.0
    probs = np.asarray(probs, dtype=np.float32)
    lesion_p = probs[list(lesions)].sum(0)
    mask = np.isin(probs.argmax(0), lesions)
    if not mask.any():
        return 0.0
    structure = ndimage.generate_binary_structure(mask.ndim, mask.ndim)
    components, n = ndimage.label(mask, structure=structure)
    index = np.arange(1, n + 1)
    sizes = ndimage.sum_labels(np.ones_like(lesion_p), components, index) * voxel_ml
    means = ndimage.mean(lesion_p, components, index)
    keep = np.asarray(sizes) >= min_ml
    return float(np.max(np.asarray(means)[keep])) if keep.any() else 0.0


def reference_abnormal(mask: np.ndarray | torch.Tensor, lesions: Sequence[int]) -> bool:
    """Truth of a study from its reference mask: abnormal when any voxel holds a lesion label."""
    values = mask.detach().cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
    return bool(lesions) and bool(np.isin(values, list(lesions)).any())
