"""torchrun integration: process group from the environment, rank-0-only writing, gathering results.

``torchrun --nproc_per_node=N -m medhybrid train ...`` sets ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``;
without them training runs as a single process. CPU ranks talk over gloo, CUDA ranks over NCCL.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def from_env() -> DistInfo:
    return DistInfo(
        rank=int(os.environ.get("RANK", 0)),
        world_size=int(os.environ.get("WORLD_SIZE", 1)),
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
    )


def init(info: DistInfo, device: torch.device) -> None:
    """Join the process group (no-op for one process)."""
    if info.enabled and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, rank=info.rank, world_size=info.world_size)


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def gather_objects(info: DistInfo, obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank."""
    if not info.enabled:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def mean_across(info: DistInfo, value: float, device: torch.device) -> float:
    if not info.enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item()) / info.world_size


def broadcast_object(info: DistInfo, obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def sync_batch_norm(model: nn.Module, info: DistInfo, device: torch.device) -> nn.Module:
    """Under DDP, BatchNorm layers become ``SyncBatchNorm``: their statistics are taken over the global
    batch, not each rank's few samples (a 3D batch of 2 per rank gives noisy statistics that differ from
    what one process with the whole batch would see). Parameter and buffer names do not change, so
    checkpoints load either way. PyTorch syncs on CUDA only: on CPU ranks the layers stay per-rank and a
    warning says so (group or instance norm, ``model.args.norm``, has no such dependence on the batch).
    """
    if not info.enabled or not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return model
    if device.type != "cuda":
        logger.warning(
            "DDP on CPU: BatchNorm statistics stay per rank (SyncBatchNorm needs CUDA); "
            "set model.args.norm: instance or group for batch-independent normalisation"
        )
        return model
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)
