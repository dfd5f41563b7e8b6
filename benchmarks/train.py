"""Validation results of the shipped pipelines, and time-to-AUROC 0.97 on PneumoniaMNIST.

Runs, in this process and one after the other:
1. ``pipelines/pneumonia_2d.yaml`` (the hybrid), then the same data, epochs, batch, optimiser and
   augmentation with MONAI's ResNet-18 (``monai_resnet18_2d``: ``monai.networks.nets.ResNet`` with its
   defaults) trained in one stage at lr 1e-3 with one warm-up epoch;
2. ``pipelines/adrenal_3d.yaml``;
3. ``pipelines/hippocampus_seg.yaml``.

Time to target = the run's ``elapsed_seconds`` (training + validation, from the first epoch; the
one-off data caching before it is excluded for both models) at the end of the first epoch whose
validation AUROC reaches 0.97. ``time_ratio_vs_resnet18`` = hybrid time / ResNet-18 time (lower is
better; ``null`` if either never reaches the target).

The last line printed is one JSON object with ``pneumonia_val_auroc``, ``pneumonia_minutes`` (the
hybrid's time to AUROC 0.97, in minutes), ``time_ratio_vs_resnet18``, ``adrenal_val_auroc`` and
``hippocampus_val_dice`` (best validation values), plus the details.

Needs the MedMNIST manifests (``make manifests``) and ../shared/data.
Usage: python benchmarks/train.py [--only pneumonia adrenal hippocampus] [--keep] [--reuse] [--out DIR]
                                  [--set KEY=VALUE ...]
(``--keep`` merges the parts run now into the results already in ``OUT/train_benchmark.json``;
``--reuse`` takes a finished run of the same resolved config from ``OUT`` instead of training it again.)
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from medhybrid.config import load_pipeline
from medhybrid.train import train
from medhybrid.train.records import finished_run, read_metrics

REPO = Path(__file__).resolve().parents[1]
PIPELINES = REPO / "pipelines"
TARGET_AUROC = 0.97
RESNET_OVERRIDES = [
    "model.name=monai_resnet18_2d",
    "model.args={}",
    "train.stages=[{name: train, epochs: 8, lr: 0.001, warmup_epochs: 1}]",
]


def run(pipeline: str, out: Path, overrides: list[str], reuse: bool = False) -> dict[str, Any]:
    cfg = load_pipeline(PIPELINES / pipeline, overrides)
    run_dir = out / f"{cfg.name}_{cfg.model.name}"
    if reuse:
        done = finished_run(run_dir, cfg.digest())
        if done is not None:
            print(f"  [{cfg.name}/{cfg.model.name}] reusing the finished run in {run_dir}", flush=True)
            history = read_metrics(run_dir)
            return {
                "pipeline": pipeline,
                "model": cfg.model.name,
                "history": history,
                "best_epoch": done["best_epoch"],
                "best_value": done["best_value"],
                "wall_seconds": None,
                "train_seconds": history[-1]["elapsed_seconds"],
                "run_dir": str(run_dir),
                "reused": True,
            }
    shutil.rmtree(run_dir, ignore_errors=True)
    t0 = time.perf_counter()

    def show(r: dict[str, Any]) -> None:
        vals = " ".join(f"{k}={v:.4f}" for k, v in r.items() if k.startswith("val_") and isinstance(v, float))
        print(f"  [{cfg.name}/{cfg.model.name}] epoch {r['epoch']} {vals} t={r['elapsed_seconds']:.0f}s", flush=True)

    result = train(cfg, run_dir, on_epoch=show)
    return {
        "pipeline": pipeline,
        "model": cfg.model.name,
        "history": result.history,
        "best_epoch": result.best_epoch,
        "best_value": result.best_value,
        "wall_seconds": round(time.perf_counter() - t0, 1),
        "train_seconds": result.history[-1]["elapsed_seconds"] if result.history else None,
        "run_dir": str(run_dir),
    }


def seconds_to(history: list[dict[str, Any]], key: str, target: float) -> float | None:
    for h in history:
        if h.get(key) is not None and h[key] >= target:
            return float(h["elapsed_seconds"])
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", default=["pneumonia", "adrenal", "hippocampus"])
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "runs")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="applied to every pipeline")
    parser.add_argument("--keep", action="store_true", help="merge into OUT/train_benchmark.json (with --only)")
    parser.add_argument("--reuse", action="store_true", help="reuse finished runs of the same config in OUT")
    args = parser.parse_args()
    out: dict[str, Any] = {}
    details: dict[str, Any] = {}
    if "pneumonia" in args.only:
        hybrid = run("pneumonia_2d.yaml", args.out, args.overrides, args.reuse)
        resnet = run("pneumonia_2d.yaml", args.out, [*args.overrides, *RESNET_OVERRIDES], args.reuse)
        th = seconds_to(hybrid["history"], "val_auroc", TARGET_AUROC)
        tr = seconds_to(resnet["history"], "val_auroc", TARGET_AUROC)
        out["pneumonia_val_auroc"] = hybrid["best_value"]
        out["pneumonia_minutes"] = round(th / 60, 3) if th is not None else None
        out["resnet18_val_auroc"] = resnet["best_value"]
        out["resnet18_minutes"] = round(tr / 60, 3) if tr is not None else None
        out["time_ratio_vs_resnet18"] = round(th / tr, 3) if th is not None and tr else None
        details["pneumonia_hybrid"], details["pneumonia_resnet18"] = hybrid, resnet
    if "adrenal" in args.only:
        adrenal = run("adrenal_3d.yaml", args.out, args.overrides, args.reuse)
        out["adrenal_val_auroc"] = adrenal["best_value"]
        out["adrenal_minutes"] = round(adrenal["train_seconds"] / 60, 2)
        details["adrenal"] = adrenal
    if "hippocampus" in args.only:
        hippo = run("hippocampus_seg.yaml", args.out, args.overrides, args.reuse)
        out["hippocampus_val_dice"] = hippo["best_value"]
        best = next(h for h in hippo["history"] if h["epoch"] == hippo["best_epoch"])
        out["hippocampus_val_dice_per_class"] = best.get("val_dice_per_class")
        out["hippocampus_minutes"] = round(hippo["train_seconds"] / 60, 2)
        details["hippocampus"] = hippo
    args.out.mkdir(parents=True, exist_ok=True)
    results = args.out / "train_benchmark.json"
    if args.keep and results.is_file():  # --only re-runs part of the benchmark; keep the other parts' results
        previous = json.loads(results.read_text())
        out = {**previous["summary"], **out}
        details = {**previous["details"], **details}
    results.write_text(json.dumps({"summary": out, "details": details}, indent=2))
    for key, value in out.items():
        print(f"{key:32s} {value}")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
