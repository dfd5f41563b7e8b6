"""The one place for process-wide runtime settings: threads, seeds, device, autocast."""

from __future__ import annotations

import logging
import os
import random

import numpy as np

logger = logging.getLogger(__name__)


def configure_threads(n: int | None = None) -> int:
    """Set torch's intra-op threads (default: the CPUs this process may use) and return the number."""
    import torch  # imported here so that ingestion-only commands start fast

    if n is None:
        n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(max(1, int(n)))
    return torch.get_num_threads()


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) generators."""
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
