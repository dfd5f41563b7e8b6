"""Training: ``medhybrid train PIPELINE.yaml`` (see docs/training.md)."""

from medhybrid.train.checkpoint import load_checkpoint, load_pretrained
from medhybrid.train.loop import RunResult, train

__all__ = ["RunResult", "load_checkpoint", "load_pretrained", "train"]
