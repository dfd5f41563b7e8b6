"""What a run leaves behind besides checkpoints: ``metrics.jsonl``, TensorBoard events, curves PNG,
``config.yaml`` and the run manifest ``run.json``. Only rank 0 writes; every file is written atomically
and fsynced (``metrics.jsonl`` is rewritten whole each epoch from the history, so a kill never leaves half
a line). ``run.json`` says ``running`` until the run's last write: :func:`finished_run` is the one test of
whether a run folder holds a finished run.

:func:`fault_point` is a test-only hook: ``MEDHYBRID_FAULT_POINT=NAME[:N]`` makes the process SIGKILL
itself the N-th time (default 1) it passes the named point, so fault tests can stop a run at an exact
place (``train_step``, ``after_checkpoint``, ``before_finish``, ``evaluate_study``, ``evaluate_outputs``).
Unset, it does nothing.
"""

from __future__ import annotations

import json
import math
import os
import signal
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from pydantic import BaseModel

from medhybrid.io.writers import atomic_write_bytes

CONFIG_FILE, METRICS_FILE, CURVES_FILE, RUN_FILE = "config.yaml", "metrics.jsonl", "curves.png", "run.json"
BEST_FILE, LAST_FILE, TB_DIR = "best.pt", "last.pt", "tensorboard"
# a cross-validation run (`train --folds`): its fold models, and the folds themselves
ENSEMBLE_FILE, FOLDS_FILE, CV_DIR = "ensemble.json", "folds.json", "cv"
METRICS_JSON = "metrics.json"  # what `evaluate` (and the pooled cross-validation report) writes
FAULT_ENV = "MEDHYBRID_FAULT_POINT"
_fault_passes: dict[str, int] = {}


def fault_point(name: str) -> None:
    """SIGKILL this process here if ``MEDHYBRID_FAULT_POINT`` names this point (module docstring)."""
    wanted = os.environ.get(FAULT_ENV)
    if not wanted:
        return
    point, _, nth = wanted.partition(":")
    if point != name:
        return
    _fault_passes[name] = _fault_passes.get(name, 0) + 1
    if _fault_passes[name] >= int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)


def json_safe(value: Any) -> Any:
    """Plain JSON data: NaN/inf become null (JSON has none; null reads as "undefined"), NumPy scalars
    become Python numbers, pydantic models their dicts, keys strings."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, BaseModel):
        return json_safe(value.model_dump())
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def write_json(path: Path, obj: Any) -> Path:
    # fsynced before the rename: after a power cut the file is the old or the new one, never empty
    return atomic_write_bytes(path, (json.dumps(json_safe(obj), indent=2) + "\n").encode(), fsync=True)


def write_config(run_dir: Path, config: dict[str, Any]) -> Path:
    return atomic_write_bytes(run_dir / CONFIG_FILE, yaml.safe_dump(config, sort_keys=False).encode(), fsync=True)


def write_metrics(run_dir: Path, history: Sequence[dict[str, Any]]) -> Path:
    lines = "".join(json.dumps(json_safe(h)) + "\n" for h in history)
    return atomic_write_bytes(run_dir / METRICS_FILE, lines.encode(), fsync=True)


def finished_run(run_dir: Path, digest: str) -> dict[str, Any] | None:
    """``run.json`` of a finished run (any status but ``running``) of the config with this digest, else None."""
    try:
        done = json.loads((Path(run_dir) / RUN_FILE).read_text())
    except (OSError, ValueError):
        return None
    return done if done.get("status") not in (None, "running") and done.get("config_digest") == digest else None


def unfinished_run(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds a run that started and never finished (``run.json`` says ``running``)."""
    try:
        return json.loads((Path(run_dir) / RUN_FILE).read_text()).get("status") == "running"
    except (OSError, ValueError, AttributeError):
        return False


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / METRICS_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class TensorBoardLog:
    """Scalars per epoch. On resume, events after ``purge_step`` (from the killed run) are dropped."""

    def __init__(self, run_dir: Path, purge_step: int | None = None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir / TB_DIR), purge_step=purge_step)

    def log(self, record: dict[str, Any]) -> None:
        step = int(record["epoch"])
        for key, value in record.items():
            if key in ("epoch", "stage") or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            group = "train" if key.startswith("train_") or key == "lr" else "val"
            self.writer.add_scalar(f"{group}/{key}", value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def plot_curves(run_dir: Path, history: Sequence[dict[str, Any]], select: str) -> Path | None:
    """Loss and the selection metric per epoch, stage boundaries dashed. ``None`` if nothing to plot."""
    if not history:
        return None
    from medhybrid.plotting import PngFigure

    epochs = [h["epoch"] for h in history]
    with PngFigure(1, 2, figsize=(10, 4)) as f:
        ax_loss, ax_metric = f.axes
        ax_loss.plot(epochs, [h.get("train_loss") for h in history], "o-", label="train")
        if any("val_loss" in h for h in history):
            ax_loss.plot(epochs, [h.get("val_loss", math.nan) for h in history], "o-", label="validation")
        ax_loss.set(xlabel="epoch", ylabel="loss", title="loss")
        ax_loss.legend()
        key = f"val_{select}"
        ax_metric.plot(epochs, [h.get(key, math.nan) for h in history], "o-", color="tab:green")
        ax_metric.set(xlabel="epoch", ylabel=select, title=f"validation {select}")
        for ax in (ax_loss, ax_metric):
            for prev, cur in zip(history, history[1:], strict=False):
                if cur["stage"] != prev["stage"]:
                    ax.axvline(cur["epoch"] - 0.5, color="grey", linestyle="--", linewidth=0.8)
            ax.grid(alpha=0.3)
        png = f.png(dpi=100)
    return atomic_write_bytes(run_dir / CURVES_FILE, png)
