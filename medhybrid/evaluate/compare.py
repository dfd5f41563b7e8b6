"""``medhybrid compare``: several models trained and evaluated under the same data, budget and seeds.

For every model and seed, the pipeline is loaded with ``model.name`` (and its ``model.args``) replaced,
the seed set, and one common schedule: ``--epochs`` (default: the pipeline's total) in a single stage at
the pipeline's last-stage learning rate with one warm-up epoch. A staged schedule that freezes modules
by name cannot apply to models without those modules, so no model gets its own schedule; the pipeline's
batch, optimiser, loss, augmentation, early stopping and data are shared.

Every model is reported on studies that no model was trained or selected on:

- ``--folds K``: each run is a K-fold cross-validation (:mod:`medhybrid.train.folds`) and the table pools
  its out-of-fold predictions;
- otherwise the manifest's ``test`` split when it has one (the runs select on ``val``);
- otherwise a **held-out** protocol: the pipeline's ``val`` split becomes the reported split, and the
  runs select their epoch (and fit their temperature and threshold) on an inner validation split carved
  out of ``train`` (one fifth, stratified and grouped by patient like the folds; ``OUT/holdout/manifest.csv``).

The selection split is never the reported one: ``--split val`` (the pipeline's selection split) is refused.
Each run is evaluated with :func:`medhybrid.evaluate.runner.evaluate` (saliency off).

The table has, per model: the task metric (AUROC or mean Dice, and accuracy/F1 at the operating point or
HD95/NSD) as the mean over seeds with the study-bootstrap 95 % CI averaged over seeds and the spread over
seeds; parameters; GFLOPs and eager forward latency for one input of the training size (batch 1, median
of ``LATENCY_REPEATS``); training time; end-to-end seconds per study in evaluation (times: the median
over seeds). The difference to
the first model comes with a paired bootstrap CI over the same studies (patients, where the manifest
names them), on the raw scores for AUROC.

Finished runs of an unchanged configuration are reused, so an interrupted comparison picks up where it
stopped.
"""

from __future__ import annotations

import csv
import functools
import json
import logging
import math
import shutil
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from medhybrid.config import PipelineConfig, load_pipeline
from medhybrid.errors import ConfigError
from medhybrid.evaluate import bootstrap as B
from medhybrid.evaluate.compare_table import csv_table, markdown_table, plot
from medhybrid.evaluate.protocols import Protocol, choose_protocol
from medhybrid.evaluate.runner import PREDICTIONS_FILE, EvaluateOptions, evaluate
from medhybrid.io.manifest import read_manifest
from medhybrid.io.writers import atomic_write_bytes
from medhybrid.models.profile import forward_gflops
from medhybrid.train import train
from medhybrid.train.checkpoint import load_checkpoint
from medhybrid.train.data import load_task_data
from medhybrid.train.loop import build_model, model_args
from medhybrid.train.records import (
    BEST_FILE,
    CONFIG_FILE,
    CV_DIR,
    FOLDS_FILE,
    finished_run,
    read_metrics,
    write_json,
)

logger = logging.getLogger(__name__)

LATENCY_REPEATS = 10


@dataclass
class CompareOptions:
    models: list[str]
    seeds: int = 1
    epochs: int | None = None
    model_args: dict[str, dict[str, Any]] = field(default_factory=dict)
    split: str | None = None  # None: test if the manifest has one, else the held-out protocol
    folds: int | None = None
    overrides: list[str] = field(default_factory=list)
    n_boot: int = B.DEFAULT_BOOTSTRAP
    device: str = "auto"


def parse_model_args(items: list[str]) -> dict[str, dict[str, Any]]:
    """``NAME={yaml mapping}`` strings -> ``{NAME: mapping}``.

    Raises:
        ConfigError: not NAME=MAPPING.
    """
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        name, sep, text = item.partition("=")
        value = yaml.safe_load(text) if sep else None
        if not sep or not name or not isinstance(value, dict):
            raise ConfigError(
                f"--model-args {item!r} is not NAME={{key: value, ...}}",
                fix="e.g. --model-args 'vit_tiny_2d={patch_size: 4, hidden_size: 192}'",
            )
        out[name.strip()] = value
    return out


def model_spec(entry: str) -> tuple[str, str]:
    """``LABEL=NAME`` or ``NAME`` -> (label, registry name); a label lets one model appear twice with
    different ``--model-args`` (e.g. ``resnet_only=hybrid_r18_3d`` with ``context: conv``)."""
    label, sep, name = entry.partition("=")
    return (label.strip(), name.strip()) if sep else (entry.strip(), entry.strip())


def run_config(
    pipeline: Path, model: str, seed_index: int, options: CompareOptions, extra: Sequence[str] = ()
) -> PipelineConfig:
    """The pipeline for one (model, seed): same data and budget, this model, this seed (``model`` is a
    ``--models`` entry; its ``--model-args`` are looked up by label); ``extra``: the protocol's overrides."""
    base = load_pipeline(pipeline, options.overrides)
    label, name = model_spec(model)
    epochs = options.epochs or sum(s.epochs for s in base.train.stages)
    lr = base.train.stages[-1].lr
    # The pipeline's own model keeps the pipeline's arguments, and a label for it (an ablation such as
    # ``resnet_only=hybrid_r18_3d`` with ``{context: conv}``) changes only what its --model-args name:
    # the same encoder and decoder, one part swapped. Other models take their --model-args alone.
    own = dict(base.model.args) if name == base.model.name else {}
    args = {**own, **options.model_args.get(label, {})}
    stage = {"name": "train", "epochs": epochs, "lr": lr, "warmup_epochs": min(1, epochs - 1)}
    return load_pipeline(
        pipeline,
        [
            *options.overrides,
            *extra,
            f"model.name={name}",
            f"model.args={json.dumps(args)}",
            f"train.stages=[{json.dumps(stage)}]",
            f"runtime.seed={base.runtime.seed + seed_index}",
        ],
    )


def profile_run(checkpoint: Path, cfg: PipelineConfig) -> dict[str, Any]:
    """Parameters, GFLOPs and eager batch-1 latency of the trained model at its training input size."""
    ckpt = load_checkpoint(checkpoint)
    model = build_model(ckpt["model_name"], ckpt["model_args"]).eval()
    size = cfg.data.patch_size if cfg.data.task == "segmentation" and cfg.data.patch_size else cfg.data.spatial_size
    x = torch.zeros(1, model.in_channels, *size)
    gflops = forward_gflops(model, x)
    times = []
    with torch.inference_mode():
        model(x)
        for _ in range(LATENCY_REPEATS):
            t0 = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - t0)
    return {
        "params": int(sum(p.numel() for p in model.parameters())),
        "gflops": gflops,
        "latency_ms": 1000 * statistics.median(times),
        "input": [1, model.in_channels, *size],
    }


def _predictions(eval_dir: Path) -> dict[str, dict[str, str]]:
    with open(eval_dir / PREDICTIONS_FILE, newline="") as fh:
        return {r["study_id"]: r for r in csv.DictReader(fh) if r["status"] == "ok"}


def _num(text: str) -> float:
    return float(text) if text not in ("", None) else math.nan


def compare(
    pipeline: Path, out: Path, options: CompareOptions, *, on_event: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """Train and evaluate every model for every seed into ``out``; write the table and the plot.

    Raises:
        ConfigError: a model that does not fit the pipeline (checked for all before anything trains), or a
            ``--split`` that some run selects on.
    """
    say = on_event or (lambda msg: logger.info("%s", msg))
    out = Path(out)
    if not options.models:
        raise ConfigError("no models to compare", fix="--models A,B,C")
    labels = [model_spec(m)[0] for m in options.models]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"--models has a label twice: {labels}", fix="name repeats LABEL=NAME")
    protocol = choose_protocol(pipeline, options, out)
    configs = {
        (model_spec(m)[0], s): run_config(pipeline, m, s, options, protocol.overrides)
        for m in options.models
        for s in range(max(options.seeds, 1))
    }
    task_data = load_task_data(next(iter(configs.values())))
    for cfg in configs.values():  # fail early: every model must fit the data before hours of training
        build_model(cfg.model.name, model_args(cfg, task_data))
    say(f"reporting on {protocol.split} ({protocol.name}); epochs selected on {protocol.calibration_split}")
    runs = [_run(model, seed_index, cfg, protocol, options, out, say) for (model, seed_index), cfg in configs.items()]
    first_cfg = next(iter(configs.values()))
    result = summarise(runs, options, first_cfg, protocol)
    result["pipeline"] = str(pipeline)
    result["command_options"] = {
        "models": options.models,
        "seeds": options.seeds,
        "epochs": first_cfg.train.stages[0].epochs,
        "split": options.split,
        "folds": options.folds,
        "model_args": options.model_args,
        "overrides": options.overrides,
    }
    write_json(out / "compare.json", result)
    atomic_write_bytes(out / "compare.md", markdown_table(result).encode())
    atomic_write_bytes(out / "compare.csv", csv_table(result).encode())
    atomic_write_bytes(out / "compare.png", plot(result))
    return result


def _run(
    model: str,
    seed_index: int,
    cfg: PipelineConfig,
    protocol: Protocol,
    options: CompareOptions,
    out: Path,
    say: Callable[[str], None],
) -> dict[str, Any]:
    """Train (or reuse) and evaluate one (model, seed) under the protocol."""
    tag = f"{model}_seed{seed_index}"
    run_dir = out / "runs" / tag
    on_epoch = functools.partial(_say_epoch, say, tag)
    if options.folds is not None:
        from medhybrid.train.folds import train_folds

        epochs = cfg.train.stages[0].epochs
        say(f"{tag}: {options.folds}-fold cross-validation ({epochs} epochs, seed {cfg.runtime.seed})")
        saved = run_dir / CONFIG_FILE
        if saved.is_file() and yaml.safe_load(saved.read_text()) != cfg.to_dict():
            shutil.rmtree(run_dir)  # another configuration (e.g. --epochs): retrain, as a plain run would
        folds_done = (run_dir / FOLDS_FILE).is_file()
        cv = train_folds(cfg, run_dir, options.folds, resume=folds_done, on_epoch=on_epoch, n_boot=options.n_boot)
        metrics, eval_dir = cv.metrics, run_dir / CV_DIR
        histories = [read_metrics(d) for d in cv.fold_dirs]
        checkpoint = cv.fold_dirs[0] / BEST_FILE
    else:
        eval_dir = out / "eval" / tag
        if finished_run(run_dir, cfg.digest()):
            say(f"{tag}: reusing the finished run")
        else:
            shutil.rmtree(run_dir, ignore_errors=True)
            say(f"{tag}: training ({cfg.train.stages[0].epochs} epochs, seed {cfg.runtime.seed})")
            train(cfg, run_dir, on_epoch=on_epoch)
        say(f"{tag}: evaluating on {protocol.split}")
        options_eval = EvaluateOptions(
            split=protocol.split,
            calibration_split=protocol.calibration_split,
            saliency=False,
            n_boot=options.n_boot,
            device=options.device,
        )
        metrics = evaluate(run_dir, cfg.data.manifest, eval_dir, options_eval).metrics
        histories = [read_metrics(run_dir)]
        checkpoint = run_dir / BEST_FILE
    return {
        "model": model,
        "registry_name": cfg.model.name,
        "seed": cfg.runtime.seed,
        "run_dir": str(run_dir),
        "eval_dir": str(eval_dir),
        "epochs": float(np.mean([len([h for h in hist if "epoch" in h]) for hist in histories])),
        "train_seconds": sum(hist[-1].get("elapsed_seconds") or 0.0 for hist in histories if hist) or None,
        "seconds_per_study": metrics.get("seconds_per_study"),
        "metrics": {k: metrics[k] for k in ("classification", "segmentation") if k in metrics},
        **profile_run(checkpoint, cfg),
    }


def _say_epoch(say: Callable[[str], None], tag: str, r: dict[str, Any]) -> None:
    vals = " ".join(f"{k}={v:.4f}" for k, v in r.items() if k.startswith("val_") and isinstance(v, float))
    say(f"{tag}: epoch {r['epoch']} {vals} t={r.get('elapsed_seconds', 0):.0f}s")


def _avg_ci(entries: list[dict[str, Any]]) -> dict[str, Any]:
    vals = [e["value"] for e in entries if e.get("value") is not None and math.isfinite(e["value"])]
    if not vals:
        return {"value": math.nan, "ci_low": math.nan, "ci_high": math.nan, "seed_sd": math.nan, "seeds": []}
    return {
        "value": float(np.mean(vals)),
        "ci_low": float(np.mean([e["ci_low"] for e in entries])),
        "ci_high": float(np.mean([e["ci_high"] for e in entries])),
        "seed_sd": float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0,
        "seeds": vals,
    }


def summarise(
    runs: list[dict[str, Any]], options: CompareOptions, cfg: PipelineConfig, protocol: Protocol
) -> dict[str, Any]:
    """Per-model rows (means over seeds) and paired differences to the first model."""
    task = "classification" if cfg.data.task == "classification" else "segmentation"
    rows = []
    by_model: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        by_model.setdefault(r["model"], []).append(r)
    for model, rs in by_model.items():
        row: dict[str, Any] = {"model": model, "seeds": len(rs)}
        if task == "classification":
            cls = [r["metrics"]["classification"] for r in rs]
            row["auroc"] = _avg_ci([c["auroc"] for c in cls])
            for k in ("accuracy", "f1", "sensitivity", "specificity"):
                row[k] = float(np.mean([c["at_operating_point"][k] for c in cls]))
            row["accuracy_argmax"] = float(np.mean([c["accuracy_argmax"] for c in cls]))
            row["ece_calibrated"] = float(np.mean([c["calibration"]["after"]["ece"] for c in cls]))
        else:
            seg = [r["metrics"]["segmentation"]["mean"] for r in rs]
            for k in ("dice", "hd95", "nsd"):
                row[k] = _avg_ci([s[k] for s in seg])
        # times: the median over seeds (robust to one run slowed by other work on the machine)
        for k in ("params", "gflops", "latency_ms", "train_seconds", "seconds_per_study", "epochs"):
            vals = [r[k] for r in rs if r.get(k) is not None]
            row[k] = float(np.median(vals)) if vals else None
        rows.append(row)
    deltas = _paired_deltas(by_model, task, options, _groups(protocol.manifest), protocol.name == "out-of-fold")
    for row in rows:
        row["delta_vs_first"] = deltas.get(row["model"])
    reference = model_spec(options.models[0])[0]
    return {
        "task": task,
        "split": protocol.split,
        "protocol": protocol.name,
        "selection_split": protocol.calibration_split,
        "reference": reference,
        "rows": rows,
        "runs": runs,
    }


def _groups(manifest: Path) -> dict[str, str] | None:
    """study_id -> sampling unit when the manifest names patients (paired CIs then resample patients)."""
    mf = read_manifest(manifest)
    return {r.study_id: r.group for r in mf.rows} if mf.has_patients else None


def _paired_deltas(
    by_model: dict[str, list[dict[str, Any]]],
    task: str,
    options: CompareOptions,
    groups: dict[str, str] | None,
    pooled_folds: bool,
) -> dict[str, Any]:
    """Each model against the first on the studies that every run scored: AUROC on the scores its table
    column uses (raw for one model; out-of-fold, each fold's calibrated probabilities, as the pooled
    out-of-fold AUROC is computed, since K models' raw scales differ)."""
    preds = {m: [_predictions(Path(r["eval_dir"])) for r in rs] for m, rs in by_model.items()}
    common = set.intersection(*(set(p) for ps in preds.values() for p in ps))
    ids = sorted(common)
    if not ids:
        return {}
    ref = model_spec(options.models[0])[0]
    # one model: rank metrics on the raw scores (calibrated ones may carry a per-half cross-fit temperature)
    column = ("probability" if pooled_folds else "probability_raw") if task == "classification" else None

    def matrix(model: str) -> np.ndarray:
        if column:
            return np.asarray([[_num(p[i][column]) for i in ids] for p in preds[model]])
        rows = []
        for p in preds[model]:
            dice_cols = [c for c in next(iter(p.values())) if c.startswith("dice_")]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # a study empty on both sides: NaN, left out
                rows.append([np.nanmean([_num(p[i][c]) for c in dice_cols]) for i in ids])
        return np.asarray(rows)

    out: dict[str, Any] = {}
    ref_m = matrix(ref)
    units = None if groups is None else np.asarray([groups.get(i, i) for i in ids])
    labels = np.asarray([int(preds[ref][0][i]["label"]) != 0 for i in ids]) if column else None
    for model in by_model:
        if model == ref:
            continue
        if labels is not None:
            out[model] = {
                "metric": "auroc",
                **B.paired_auroc_delta(labels, matrix(model), ref_m, groups=units, n_boot=options.n_boot),
            }
        else:
            delta = B.paired_mean_delta(matrix(model), ref_m, groups=units, n_boot=options.n_boot)
            out[model] = {"metric": "dice", **delta}
        out[model]["n_studies"] = len(ids)
    return out
