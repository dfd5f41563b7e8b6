"""The contract every medhybrid model keeps, and the small helpers the model modules share.

Output contract: ``forward(x)`` takes ``(B, C, *spatial)`` and returns a dict with
``"logits"`` ``(B, num_classes)`` when the model classifies and ``"seg_logits"``
``(B, seg_classes, *spatial)`` (same spatial size as the input) when it segments.
``forward_features(x)`` returns the encoder's feature maps, shallow to deep.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from medhybrid.errors import ModelError, ModelInputError

if TYPE_CHECKING:
    from medhybrid.models.registry import ModelEntry

ConfigT = TypeVar("ConfigT")


class MedModel(nn.Module):
    """Base class: input checks and the output contract shared by hybrids and baselines.

    Attributes:
        spatial_dims: 2 or 3.
        in_channels: channels the input must have.
        num_classes: classification outputs (0: the model does not classify).
        seg_classes: segmentation channels (0: the model does not segment).
        size_divisor: spatial sizes the network needs, per axis; inputs are zero-padded up to a multiple
            and the mask is cropped back, so callers may pass any size.
        min_size: smallest spatial size the network works at (smaller inputs are padded up to it).
        fixed_size: the one spatial size the network accepts (ViT/UNETR: their ``img_size``), or None for any.
        entry: the registry entry, set by ``create_model``.
    """

    entry: ModelEntry | None = None

    def __init__(
        self,
        *,
        spatial_dims: int,
        in_channels: int,
        num_classes: int,
        seg_classes: int,
        size_divisor: int | Sequence[int] = 1,
        min_size: int | Sequence[int] = 1,
        fixed_size: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ModelError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        if in_channels < 1:
            raise ModelError(f"in_channels must be >= 1, got {in_channels}")
        if num_classes < 0 or seg_classes < 0 or num_classes + seg_classes == 0:
            raise ModelError(
                f"need num_classes > 0 or seg_classes > 0 (got {num_classes} and {seg_classes})",
                fix="set num_classes for classification, seg_classes for segmentation, or both",
            )
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.seg_classes = seg_classes
        self.size_divisor = as_tuple(size_divisor, spatial_dims)
        self.min_size = as_tuple(min_size, spatial_dims)
        self.fixed_size = tuple(fixed_size) if fixed_size is not None else None

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(
            t for t, on in (("classification", self.num_classes > 0), ("segmentation", self.seg_classes > 0)) if on
        )

    def check_input(self, x: torch.Tensor) -> None:
        """Raise :class:`ModelInputError` unless ``x`` is ``(B, in_channels, *spatial)`` of the right size."""
        if x.dim() != self.spatial_dims + 2:
            axes = "D, H, W" if self.spatial_dims == 3 else "H, W"
            raise ModelInputError(
                f"expected a {self.spatial_dims + 2}-D tensor (B, C, {axes}), got shape {tuple(x.shape)}",
                fix="add the batch and channel axes, or pick a model with the other spatial_dims",
            )
        if x.shape[1] != self.in_channels:
            raise ModelInputError(
                f"model expects {self.in_channels} input channel(s), got {x.shape[1]}",
                fix="build the model with in_channels matching the data",
            )
        if self.fixed_size is not None and tuple(x.shape[2:]) != self.fixed_size:
            raise ModelInputError(
                f"model was built for spatial size {self.fixed_size}, got {tuple(x.shape[2:])}",
                fix="build it with img_size equal to the input size, or use sliding-window inference",
            )

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The encoder's feature maps (or token sequences), shallow to deep."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError


def as_tuple(value: int | Sequence[int], n: int) -> tuple[int, ...]:
    """An int repeated ``n`` times, or a sequence of length ``n`` as a tuple.

    Raises:
        ModelError: a sequence of the wrong length.
    """
    if isinstance(value, int):
        return (value,) * n
    out = tuple(int(v) for v in value)
    if len(out) != n:
        raise ModelError(f"expected {n} values (one per spatial axis), got {out}")
    return out


def reduced_size(size: Sequence[int], reduction: Sequence[int]) -> tuple[int, ...]:
    """The size of a map of ``size`` after a total stride of ``reduction`` per axis (rounded up, as padded
    strided convolutions and pools give), e.g. a hybrid's token grid."""
    return tuple(math.ceil(s / r) for s, r in zip(size, reduction, strict=True))


def padded_size(size: Sequence[int], divisor: Sequence[int], min_size: Sequence[int] | None = None) -> list[int]:
    """``size`` rounded up to a multiple of ``divisor``, and at least ``min_size``."""
    low = min_size or (1,) * len(size)
    return [math.ceil(max(s, m) / d) * d for s, d, m in zip(size, divisor, low, strict=True)]


def pad_to_multiple(
    x: torch.Tensor, divisor: Sequence[int], min_size: Sequence[int] | None = None
) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Zero-pad the spatial axes of ``x`` (at the end) up to a multiple of ``divisor`` (and ``min_size``).

    Returns the padded tensor and the original spatial size (for :func:`crop_to`).
    """
    size = tuple(x.shape[2:])
    target = padded_size(size, divisor, min_size)
    if list(size) == target:
        return x, size
    pad: list[int] = []
    for s, t in zip(reversed(size), reversed(target), strict=True):  # F.pad lists the last axis first
        pad += [0, t - s]
    return F.pad(x, pad), size


def crop_to(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Crop the spatial axes of ``x`` (from the start) to ``size``."""
    if tuple(x.shape[2:]) == tuple(size):
        return x
    index = (slice(None), slice(None), *(slice(0, s) for s in size))
    return x[index]


def build_config(cls: type[ConfigT], defaults: Mapping[str, Any], overrides: Mapping[str, Any]) -> ConfigT:
    """A config dataclass from a variant's defaults and the caller's overrides.

    Raises:
        ModelError: an override names no field of the config (the message lists the valid ones).
    """
    fields = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ModelError(
            f"unknown model option(s) {', '.join(unknown)} for {cls.__name__}",
            fix=f"valid options: {', '.join(sorted(fields))}",
        )
    return cls(**{**defaults, **overrides})


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
