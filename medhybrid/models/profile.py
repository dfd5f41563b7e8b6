"""Model size and cost: parameters and FLOPs (torch's flop counter) for one input shape."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from medhybrid.errors import ModelInputError
from medhybrid.models.base import count_parameters, reduced_size
from medhybrid.models.registry import create_model, get_entry


@dataclass(frozen=True)
class ModelSummary:
    """One registry row: what a model is and what one forward pass on ``input_size`` costs."""

    name: str
    family: str
    spatial_dims: int
    tasks: tuple[str, ...]
    params_m: float
    gflops: float | None
    input_size: tuple[int, ...] | None
    description: str
    token_grid: tuple[int, ...] | None = None  # a hybrid's Transformer grid for ``input_size``

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def _cpu_sdpa_flops(
    query_shape: torch.Size, key_shape: torch.Size, value_shape: torch.Size, *args: object, **kwargs: object
) -> int:
    return int(sdpa_flop_count(query_shape, key_shape, value_shape))


# torch's counter knows the CUDA attention kernels but not the CPU one that SDPA dispatches to; without this,
# attention written with SDPA (the hybrid) would be counted as free while einsum attention (MONAI) is not.
_EXTRA_FLOPS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops}


def forward_gflops(model: torch.nn.Module, x: torch.Tensor) -> float:
    """GFLOPs of one eval-mode forward pass (a multiply-add counts 2; convolutions, matmuls and attention)."""
    model.eval()
    with FlopCounterMode(display=False, custom_mapping=_EXTRA_FLOPS) as counter, torch.no_grad():
        model(x)
    return counter.get_total_flops() / 1e9


DEFAULT_SIZES = {2: (1, 128, 128), 3: (1, 64, 64, 64)}


def summarize(name: str, input_size: Sequence[int] | None = None, batch: int = 1) -> ModelSummary:
    """Build ``name`` and count its parameters, and its GFLOPs for ``(batch, *input_size)``.

    ``input_size`` is ``(C, *spatial)``, by default :data:`DEFAULT_SIZES` for the model's spatial dims;
    it is skipped (gflops None) when its number of spatial axes does not match the model's. Fixed-size
    models are built for that size.

    Raises:
        UnknownModelError: no such model.
        ModelInputError: ``input_size`` is not ``(C, H, W)`` or ``(C, D, H, W)``.
    """
    entry = get_entry(name)
    size = tuple(int(s) for s in input_size) if input_size else DEFAULT_SIZES[entry.spatial_dims]
    if len(size) not in (3, 4):
        raise ModelInputError(f"input size must be C H W or C D H W, got {size}")
    fits = len(size) - 1 == entry.spatial_dims
    kwargs: dict[str, object] = {}
    if fits:
        kwargs["in_channels"] = size[0]
        if entry.fixed_size or entry.family == "hybrid":
            kwargs["img_size"] = size[1:]  # a hybrid plans its strides (its token grid) for this size
    model = create_model(name, **kwargs)
    gflops = forward_gflops(model, torch.zeros(batch, *size)) if fits else None
    return ModelSummary(
        name=name,
        family=entry.family,
        spatial_dims=entry.spatial_dims,
        tasks=entry.tasks,
        params_m=count_parameters(model) / 1e6,
        gflops=gflops,
        input_size=size if fits else None,
        description=entry.description,
        token_grid=token_grid(model, size[1:]) if fits else None,
    )


def token_grid(model: torch.nn.Module, spatial: Sequence[int]) -> tuple[int, ...] | None:
    """The token grid a hybrid's context head sees for an input of ``spatial`` (None for other models)."""
    reductions = getattr(getattr(model, "encoder", None), "reductions", None)
    if getattr(model, "context", None) is None or not reductions:
        return None
    return reduced_size(spatial, reductions[-1])
