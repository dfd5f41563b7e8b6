"""``medhybrid train``: staged fine-tuning with validation, checkpoints, exact resume and DDP.

One run = the stages of ``train.stages`` in order. Each stage builds its optimiser afresh (its frozen
modules and per-prefix learning rates differ) with a per-step warm-up + cosine schedule. After every
epoch: validation, ``last.pt``, ``best.pt`` if the selection metric improved, ``metrics.jsonl``,
TensorBoard, curves. ``train.early_stopping`` ends a stage after that many epochs without improvement
(the last stage's end is the run's end).

Exact resume: generator states are re-derived from ``(seed, epoch)`` at every epoch start (see
:mod:`medhybrid.train.data`), so continuing from ``last.pt`` replays the remaining epochs exactly as an
uninterrupted run would. A run killed before its first ``last.pt`` (``run.json`` still says ``running``)
has nothing to continue from: ``--resume`` starts it again from epoch 1.

What a kill leaves behind: every file is replaced atomically (checkpoints also fsynced), ``last.pt`` is
the newest complete epoch, and ``run.json`` says ``running`` until the very last write, so a killed run
is never taken for a finished one (:func:`medhybrid.train.records.finished_run`).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medhybrid.config import PipelineConfig
from medhybrid.errors import CheckpointError, ConfigError, ModelError, TrainingError
from medhybrid.evaluate.study_score import lesion_labels
from medhybrid.infer.scope import manifest_scope
from medhybrid.io.writers import sha256_file
from medhybrid.models import create_model, get_entry
from medhybrid.models.base import MedModel
from medhybrid.runtime import autocast, configure_threads, prefer_memory_format, seed_everything
from medhybrid.train import distributed as dist_utils
from medhybrid.train import records
from medhybrid.train.checkpoint import (
    RESUME_REQUIRED,
    load_checkpoint,
    load_pretrained,
    package_versions,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from medhybrid.train.data import TaskData, build_loaders, class_weights, load_task_data, mix_seed
from medhybrid.train.evaluate import Validator, is_better
from medhybrid.train.optim import (
    TaskLoss,
    check_frozen_are_pretrained,
    make_optimizer,
    make_scheduler,
    mark_untrainable,
    param_groups,
)

logger = logging.getLogger(__name__)

EpochCallback = Callable[[dict[str, Any]], None]


@dataclass
class RunResult:
    run_dir: Path
    history: list[dict[str, Any]]
    best_epoch: int | None
    best_value: float | None
    status: str


def resolve_device(name: str, info: dist_utils.DistInfo) -> torch.device:
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("runtime.device: cuda requested but no CUDA device is available", fix="use auto or cpu")
        torch.cuda.set_device(info.local_rank)
        return torch.device("cuda", info.local_rank)
    return torch.device("cpu")


def model_args(cfg: PipelineConfig, task: TaskData) -> dict[str, Any]:
    """The registry overrides for this task: class/mask counts, unused head off, input size; then the
    pipeline's own ``model.args`` (which must agree with the data).

    Raises:
        ConfigError: unknown model, a model that cannot do the task, or args contradicting the data.
    """
    try:
        entry = get_entry(cfg.model.name)
    except ModelError as exc:
        raise ConfigError(f"model.name: {exc.message}", fix=exc.fix) from None
    data = cfg.data
    if entry.spatial_dims != data.spatial_dims:
        raise ConfigError(
            f"model.name: {entry.name} is {entry.spatial_dims}D but data.spatial_dims is {data.spatial_dims}",
            fix="pick a model with the same number of dimensions (medhybrid models)",
        )
    needed = {"classification": ("classification",), "segmentation": ("segmentation",)}.get(
        data.task, ("classification", "segmentation")
    )
    missing = [t for t in needed if t not in entry.tasks]
    if missing:
        raise ConfigError(
            f"model.name: {entry.name} cannot do {' and '.join(missing)} (it does {list(entry.tasks)})",
            fix="pick a model for the task (medhybrid models --task ...)",
        )
    args: dict[str, Any] = {}
    if "classification" in entry.tasks:
        args["num_classes"] = task.num_classes if "classification" in needed else 0
    if "segmentation" in entry.tasks:
        args["seg_classes"] = task.seg_classes if "segmentation" in needed else 0
    if entry.family != "resnet":
        size = data.patch_size if data.task == "segmentation" and data.patch_size else data.spatial_size
        args["img_size"] = list(size)
    for key in ("num_classes", "seg_classes"):
        if key in cfg.model.args and key in args and cfg.model.args[key] != args[key]:
            raise ConfigError(
                f"model.args.{key}={cfg.model.args[key]} contradicts the data ({args[key]})",
                fix=f"remove model.args.{key}: it is set from the label names",
            )
    return {**args, **cfg.model.args}


def build_model(name: str, args: dict[str, Any]) -> MedModel:
    try:
        return create_model(name, **args)
    except ModelError as exc:
        raise ConfigError(f"model: {exc.message}", fix=exc.fix or "see docs/models.md") from None


class Trainer:
    """One training run in ``run_dir`` (see the module docstring)."""

    def __init__(
        self, cfg: PipelineConfig, run_dir: Path, *, resume: bool = False, on_epoch: EpochCallback | None = None
    ) -> None:
        self.cfg, self.run_dir, self.resume, self.on_epoch = cfg, Path(run_dir), resume, on_epoch
        self.info = dist_utils.from_env()
        self.last_path = self.run_dir / records.LAST_FILE
        self.best_path = self.run_dir / records.BEST_FILE
        self._check_run_dir()

    def _check_run_dir(self) -> None:
        if self.resume and not self.last_path.is_file():
            if records.unfinished_run(self.run_dir):
                logger.warning("%s: killed before its first epoch ended: starting it again", self.run_dir)
                self.resume = False
                return
            raise TrainingError(
                "--resume: no last.pt in the run folder", path=self.run_dir, fix="start without --resume"
            )
        if not self.resume and self.last_path.is_file():
            raise TrainingError(
                "the run folder already holds a run",
                path=self.run_dir,
                fix="pass --resume to continue it, or --out with a new folder",
            )

    # --- set-up ---------------------------------------------------------------------------------

    def run(self) -> RunResult:
        cfg, info = self.cfg, self.info
        configure_threads(cfg.runtime.threads)
        self.device = resolve_device(cfg.runtime.device, info)
        dist_utils.init(info, self.device)
        try:
            return self._run()
        finally:
            dist_utils.shutdown()

    def _run(self) -> RunResult:
        cfg, info = self.cfg, self.info
        start = None
        if self.resume:
            start = load_checkpoint(self.last_path, require=RESUME_REQUIRED)
            _check_same_config(start["config"], cfg.to_dict(), self.last_path)
            _check_resumable(start, cfg, self.last_path)
        seed_everything(cfg.runtime.seed)
        task = load_task_data(cfg)
        self.task = task
        self.model_args = model_args(cfg, task)
        model = build_model(cfg.model.name, self.model_args)
        model = prefer_memory_format(dist_utils.sync_batch_norm(model, info, self.device).to(self.device))
        mark_untrainable(model)
        pretrained: set[str] = set()
        if cfg.model.pretrained is not None and (start is None or any(s.freeze for s in cfg.train.stages)):
            # Loaded on resume too when a stage freezes: which parameters came from the weights decides what
            # it may freeze (the resumed state then replaces every value).
            report = load_pretrained(model, cfg.model.pretrained)
            pretrained = set(report.loaded)
            if start is None:
                logger.warning("pretrained %s: %s", cfg.model.pretrained, report.summary())
            self.pretrained_report = report.summary()
        check_frozen_are_pretrained(model, cfg.train.stages, pretrained)
        loader, train_set, val_items, val_tf = build_loaders(cfg, task, rank=info.rank, world_size=info.world_size)
        weights = None
        if cfg.train.class_balance == "weighted_loss" and cfg.data.task != "segmentation":
            weights = class_weights([r.label for r in task.train_rows if r.label is not None], task.num_classes)
        loss_fn = TaskLoss(cfg.train.loss, cfg.data.task, weights).to(self.device)
        validator = Validator(
            cfg,
            val_items,
            val_tf,
            loss_fn,
            info,
            self.device,
            task.num_classes,
            task.seg_classes,
            lesions=lesion_labels(task.mask_kinds),
        )
        self.manifest_sha = sha256_file(cfg.data.manifest)
        self.scope = manifest_scope(cfg.data)  # what inference may assess (medhybrid/infer/scope.py)

        history: list[dict[str, Any]] = []
        best_value: float | None = None
        best_epoch: int | None = None
        first_stage, first_stage_epoch, bad_epochs = 0, 0, 0
        if start is not None:
            if info.is_main:
                self._repair_best(start)
            _restore(self.last_path, "model", model.load_state_dict, start["model"])
            _restore(self.last_path, "rng", set_rng_state, start["rng"])  # every epoch re-derives them anyway
            history = list(start["history"])
            best = start["best"]
            best_value, best_epoch, bad_epochs = best["value"], best["epoch"], best["bad_epochs"]
            first_stage, first_stage_epoch = start["stage"], start["stage_epoch"]
            if first_stage_epoch >= cfg.train.stages[first_stage].epochs or best.get("stage_stopped"):
                first_stage, first_stage_epoch, bad_epochs = first_stage + 1, 0, 0
        if info.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            records.write_config(self.run_dir, cfg.to_dict())
            records.write_metrics(self.run_dir, history)
        tb = (
            records.TensorBoardLog(self.run_dir, purge_step=len(history) + 1 if start else None)
            if info.is_main
            else None
        )
        self._write_run_manifest(history, best_epoch, best_value, status="running")

        select = cfg.eval.select
        epoch = len(history)
        elapsed = history[-1]["elapsed_seconds"] if history else 0.0
        status = "completed"
        steps = len(loader)
        try:
            for s in range(first_stage, len(cfg.train.stages)):
                stage = cfg.train.stages[s]
                groups = param_groups(model, stage)
                optimizer = make_optimizer(groups, cfg.train.optimizer)
                scheduler = make_scheduler(
                    optimizer,
                    total_steps=stage.epochs * steps,
                    warmup_steps=stage.warmup_epochs * steps,
                    schedule=cfg.train.schedule,
                )
                stage_epoch = 0
                if start is not None and s == first_stage and first_stage_epoch > 0:
                    _restore(self.last_path, "optimizer", optimizer.load_state_dict, start["optimizer"])
                    _restore(self.last_path, "scheduler", scheduler.load_state_dict, start["scheduler"])
                    stage_epoch = first_stage_epoch
                else:
                    bad_epochs = 0
                net: nn.Module = model
                if info.enabled:
                    net = nn.parallel.DistributedDataParallel(
                        model, device_ids=[self.device.index] if self.device.type == "cuda" else None
                    )
                while stage_epoch < stage.epochs:
                    t0 = time.perf_counter()
                    seed_everything(mix_seed(cfg.runtime.seed, epoch, info.rank))
                    train_set.set_epoch(epoch)
                    loader.batch_sampler.set_epoch(epoch)  # type: ignore[union-attr]
                    train_loss = self._train_epoch(net, model, loader, loss_fn, optimizer, scheduler, epoch)
                    metrics = validator.run(model)
                    op_point = metrics.pop("operating_point", None)
                    epoch, stage_epoch = epoch + 1, stage_epoch + 1
                    value = metrics.get(select, math.nan)
                    improved = is_better(value, best_value, select)
                    if improved:
                        best_value, best_epoch, bad_epochs = value, epoch, 0
                    else:
                        bad_epochs += 1
                    elapsed += time.perf_counter() - t0
                    record = {
                        "epoch": epoch,
                        "stage": stage.name,
                        "lr": optimizer.param_groups[0]["lr"] / optimizer.param_groups[0].get("lr_scale", 1.0),
                        "train_loss": train_loss,
                        **{f"val_{k}": v for k, v in metrics.items() if k != "n"},
                        "best": improved,
                        "epoch_seconds": round(time.perf_counter() - t0, 3),
                        "elapsed_seconds": round(elapsed, 3),
                    }
                    history.append(record)
                    stopped = (
                        cfg.train.early_stopping is not None
                        and bad_epochs >= cfg.train.early_stopping
                        and stage_epoch < stage.epochs  # patience running out on the stage's last epoch is no stop
                    )
                    best_state = {
                        "value": best_value,
                        "epoch": best_epoch,
                        "bad_epochs": bad_epochs,
                        "stage_stopped": stopped,
                        "operating_point": op_point,
                    }
                    if info.is_main:
                        payload = self._payload(model, optimizer, scheduler, s, stage_epoch, epoch, history, best_state)
                        save_checkpoint(self.last_path, payload)
                        records.fault_point("after_checkpoint")
                        if improved:
                            save_checkpoint(self.best_path, payload)
                        records.write_metrics(self.run_dir, history)
                        assert tb is not None
                        tb.log(record)
                        records.plot_curves(self.run_dir, history, select)
                    dist_utils.barrier(info)
                    if self.on_epoch is not None and info.is_main:
                        self.on_epoch(record)
                    if stopped:
                        logger.info("early stopping: stage %s after %d epochs", stage.name, stage_epoch)
                        if s == len(cfg.train.stages) - 1:
                            status = "early_stopped"
                        break
        finally:
            if tb is not None:
                tb.close()
        if best_epoch is None and info.is_main:  # nothing ever improved (e.g. NaN metric): keep the last
            save_checkpoint(self.best_path, load_checkpoint(self.last_path))
        records.fault_point("before_finish")
        self._write_run_manifest(history, best_epoch, best_value, status=status)
        return RunResult(self.run_dir, history, best_epoch, best_value, status)

    def _repair_best(self, last: dict[str, Any]) -> None:
        """Make ``best.pt`` the recorded best epoch again after a kill.

        Each epoch writes ``last.pt`` first, then (if it improved) ``best.pt``. A kill between the two
        leaves a ``last.pt`` that records itself as the best epoch beside a ``best.pt`` of an older one;
        resuming would then never write that epoch's ``best.pt``. Since ``last.pt`` *is* that epoch's
        payload, it is copied over."""
        best_epoch = (last.get("best") or {}).get("epoch")
        if best_epoch is None:
            return
        current = load_checkpoint(self.best_path).get("epoch") if self.best_path.is_file() else None
        if current == best_epoch:
            return
        if last.get("epoch") == best_epoch:
            logger.warning("best.pt held epoch %s, the best epoch is %s: restored from last.pt", current, best_epoch)
            save_checkpoint(self.best_path, {k: v for k, v in last.items() if k not in ("format", "format_version")})
        else:
            logger.warning(
                "best.pt holds epoch %s but the best epoch was %s, whose weights are no longer on disk",
                current,
                best_epoch,
            )

    # --- one epoch ------------------------------------------------------------------------------

    def _train_epoch(
        self,
        net: nn.Module,
        model: nn.Module,
        loader: Any,
        loss_fn: TaskLoss,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        epoch: int,
    ) -> float:
        cfg = self.cfg
        net.train()
        trainable = [p for p in model.parameters() if p.requires_grad]
        total, count = 0.0, 0
        for step, batch in enumerate(loader):
            image = batch["image"].to(self.device, non_blocking=True)
            ctx = autocast(self.device) if cfg.train.amp else contextlib.nullcontext()
            with ctx:
                out = net(image)
            loss = loss_fn(out, {k: v for k, v in batch.items() if k in ("label", "mask")})
            if not torch.isfinite(loss):
                raise TrainingError(
                    f"the loss became {loss.item()} at epoch {epoch + 1}, step {step + 1}",
                    path=self.run_dir,
                    fix="lower the learning rate, enable train.grad_clip, or check the intensity preset",
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.train.grad_clip is not None:
                nn.utils.clip_grad_norm_(trainable, cfg.train.grad_clip)
            optimizer.step()
            scheduler.step()
            records.fault_point("train_step")
            total += float(loss.item())
            count += 1
        return dist_utils.mean_across(self.info, total / max(1, count), self.device)

    # --- files ----------------------------------------------------------------------------------

    def _payload(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        stage: int,
        stage_epoch: int,
        epoch: int,
        history: list[dict[str, Any]],
        best: dict[str, Any],
    ) -> dict[str, Any]:
        cfg = self.cfg
        config = cfg.to_dict()
        return {
            "model_name": cfg.model.name,
            "model_args": self.model_args,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": rng_state(),
            "config": config,
            "preprocessing": config["data"],
            "scope": self.scope,
            "task": cfg.data.task,
            "label_names": {int(k): v for k, v in self.task.label_names.items()},
            "mask_label_names": {int(k): v for k, v in self.task.mask_label_names.items()},
            "mask_kinds": {int(k): v for k, v in self.task.mask_kinds.items()},
            "versions": package_versions(),
            "manifest_sha256": self.manifest_sha,
            "seed": cfg.runtime.seed,
            "stage": stage,
            "stage_epoch": stage_epoch,
            "epoch": epoch,
            "best": best,
            # the decision threshold inference applies, from this epoch's validation (None: no labels)
            "operating_point": best.get("operating_point"),
            "history": history,
            "world_size": self.info.world_size,
        }

    def _write_run_manifest(
        self, history: list[dict[str, Any]], best_epoch: int | None, best_value: float | None, *, status: str
    ) -> None:
        if not self.info.is_main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        cfg = self.cfg
        files = {}
        for name in (records.BEST_FILE, records.LAST_FILE, records.CONFIG_FILE, records.METRICS_FILE):
            p = self.run_dir / name
            if p.is_file() and status != "running":
                files[name] = {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
        records.write_json(
            self.run_dir / records.RUN_FILE,
            {
                "name": cfg.name,
                "status": status,
                "config_digest": cfg.digest(),
                "model": cfg.model.name,
                "model_args": getattr(self, "model_args", None),
                "pretrained": getattr(self, "pretrained_report", None),
                "task": cfg.data.task,
                "manifest": str(cfg.data.manifest),
                "manifest_sha256": getattr(self, "manifest_sha", None),
                "train_studies": len(self.task.train_rows) if hasattr(self, "task") else None,
                "val_studies": len(self.task.val_rows) if hasattr(self, "task") else None,
                "seed": cfg.runtime.seed,
                "world_size": self.info.world_size,
                "device": str(getattr(self, "device", "cpu")),
                "threads": torch.get_num_threads(),
                "epochs_run": len(history),
                "select": cfg.eval.select,
                "best_epoch": best_epoch,
                "best_value": best_value,
                "final": history[-1] if history else None,
                "versions": package_versions(),
                "files": files,
                "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            },
        )


def _check_resumable(start: dict[str, Any], cfg: PipelineConfig, path: Path) -> None:
    """What the checked fields of ``last.pt`` must also agree on with the pipeline (same config already).

    Raises:
        CheckpointError: the stage or epoch counters do not fit the pipeline's stages or the history.
    """
    stages = cfg.train.stages
    if start["stage"] >= len(stages) or start["stage_epoch"] > stages[start["stage"]].epochs:
        raise CheckpointError(
            f"field 'stage'/'stage_epoch' ({start['stage']}/{start['stage_epoch']}) does not fit the pipeline's "
            f"{len(stages)} stages",
            path=path,
            fix="the file was edited or damaged: start a new --out folder",
        )
    if len(start["history"]) != start["epoch"]:
        raise CheckpointError(
            f"field 'history' holds {len(start['history'])} epochs but 'epoch' is {start['epoch']}",
            path=path,
            fix="the file was edited or damaged: start a new --out folder",
        )


def _restore(path: Path, name: str, load: Callable[[Any], Any], state: Any) -> None:
    """``load(state)`` for one part of ``last.pt`` (model, optimizer, scheduler, generators); a state that
    does not fit is a :class:`CheckpointError` naming the field, not a traceback."""
    try:
        load(state)
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise CheckpointError(
            f"field {name!r} does not fit this pipeline's {name} ({first[:200]})",
            path=path,
            fix="the file was edited or damaged: start a new --out folder",
        ) from None


def _check_same_config(saved: dict[str, Any], current: dict[str, Any], path: Path) -> None:
    """Resuming with a different pipeline would silently mix two runs; name the first differences."""
    diffs: list[str] = []

    def walk(a: Any, b: Any, where: str) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(set(a) | set(b), key=str):
                walk(a.get(k), b.get(k), f"{where}.{k}" if where else str(k))
        elif a != b:
            diffs.append(f"{where}: {a!r} -> {b!r}")

    walk(saved, current, "")
    if diffs:
        raise TrainingError(
            "--resume with a different pipeline (" + "; ".join(diffs[:3]) + (" ..." if len(diffs) > 3 else "") + ")",
            path=path,
            fix="resume with the same pipeline and --set options, or start a new --out folder",
        )


def train(
    cfg: PipelineConfig, run_dir: Path, *, resume: bool = False, on_epoch: EpochCallback | None = None
) -> RunResult:
    """Train ``cfg`` into ``run_dir`` (see :class:`Trainer`)."""
    return Trainer(cfg, run_dir, resume=resume, on_epoch=on_epoch).run()
