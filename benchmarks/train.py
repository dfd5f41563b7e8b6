"""Out-of-fold accuracy of the shipped pipelines (``medhybrid train --folds``), and training speed.

Runs, in this process and one after the other, a K-fold cross-validation (default 5) of:
1. ``pipelines/pneumonia_2d.yaml`` (the hybrid), then the same data, folds, epochs, batch, optimiser and
   augmentation with MONAI's ResNet-18 (``monai_resnet18_2d``: ``monai.networks.nets.ResNet`` with its
   defaults) trained in one stage at lr 1e-3 with one warm-up epoch;
2. ``pipelines/adrenal_3d.yaml``;
3. ``pipelines/hippocampus_seg.yaml``.

Every accuracy figure is **out-of-fold**: each study is scored by the fold model that never trained or
selected on it (:mod:`medhybrid.train.folds`), pooled over the K folds, with a BCa 95 % CI. Each fold
trains on K - 2 folds and selects its epoch on one more, so a fold model sees 60 % of the studies (5 folds).

Speed: time to AUROC 0.97 = the run's ``elapsed_seconds`` (training + validation, from the first epoch;
the one-off data caching before it is excluded) at the end of the first epoch whose validation AUROC
reaches 0.97, in fold 0 of each model (its inner validation fold; a speed figure, nothing is selected by
it). ``time_ratio_vs_resnet18`` = hybrid time / ResNet-18 time (``null`` if either never gets there).

The last line printed is one JSON object with the out-of-fold figures and the details.

Needs the MedMNIST manifests (``make manifests``) and ../shared/data.
Usage: python benchmarks/train.py [--only pneumonia adrenal hippocampus] [--folds 5] [--out DIR]
                                  [--set KEY=VALUE ...]
(finished folds of an unchanged configuration in ``OUT`` are reused; ``--fresh`` starts over.)
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
from medhybrid.train.folds import train_folds
from medhybrid.train.records import FOLDS_FILE, read_metrics

REPO = Path(__file__).resolve().parents[1]
PIPELINES = REPO / "pipelines"
TARGET_AUROC = 0.97
RESNET_OVERRIDES = [
    "model.name=monai_resnet18_2d",
    "model.args={}",
    "train.stages=[{name: train, epochs: 8, lr: 0.001, warmup_epochs: 1}]",
]


def run(pipeline: str, out: Path, overrides: list[str], folds: int, fresh: bool) -> dict[str, Any]:
    cfg = load_pipeline(PIPELINES / pipeline, overrides)
    run_dir = out / f"cv_{cfg.name}_{cfg.model.name}"
    if fresh:
        shutil.rmtree(run_dir, ignore_errors=True)
    t0 = time.perf_counter()

    def show(r: dict[str, Any]) -> None:
        vals = " ".join(f"{k}={v:.4f}" for k, v in r.items() if k.startswith("val_") and isinstance(v, float))
        print(f"  [{cfg.name}/{cfg.model.name}] epoch {r['epoch']} {vals} t={r['elapsed_seconds']:.0f}s", flush=True)

    def event(msg: str) -> None:
        print(f"  [{cfg.name}/{cfg.model.name}] {msg}", flush=True)

    resume = (run_dir / FOLDS_FILE).is_file()
    cv = train_folds(cfg, run_dir, folds, resume=resume, on_epoch=show, on_event=event)
    histories = [read_metrics(d) for d in cv.fold_dirs]
    return {
        "pipeline": pipeline,
        "model": cfg.model.name,
        "folds": folds,
        "metrics": {k: cv.metrics.get(k) for k in ("classification", "segmentation", "per_fold", "n_studies")},
        "fold0_history": histories[0],
        "train_minutes": round(sum(h[-1]["elapsed_seconds"] for h in histories if h) / 60, 2),
        # the budget each fold had: the pipeline's epochs, and the minutes its training took
        "budget": {
            "epochs": sum(st.epochs for st in cfg.train.stages),
            "minutes_per_fold": round(sum(h[-1]["elapsed_seconds"] for h in histories if h) / 60 / folds, 2),
        },
        "wall_minutes": round((time.perf_counter() - t0) / 60, 2),
        "run_dir": str(run_dir),
    }


def seconds_to(history: list[dict[str, Any]], key: str, target: float) -> float | None:
    for h in history:
        if h.get(key) is not None and h[key] >= target:
            return float(h["elapsed_seconds"])
    return None


def ci(entry: dict[str, Any]) -> list[float]:
    return [round(entry[k], 4) for k in ("value", "ci_low", "ci_high")]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", default=["pneumonia", "adrenal", "hippocampus"])
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "runs")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="applied to every pipeline")
    parser.add_argument("--fresh", action="store_true", help="retrain instead of reusing finished folds")
    args = parser.parse_args()
    out: dict[str, Any] = {"folds": args.folds}
    details: dict[str, Any] = {}
    if "pneumonia" in args.only:
        hybrid = run("pneumonia_2d.yaml", args.out, args.overrides, args.folds, args.fresh)
        resnet = run("pneumonia_2d.yaml", args.out, [*args.overrides, *RESNET_OVERRIDES], args.folds, args.fresh)
        th = seconds_to(hybrid["fold0_history"], "val_auroc", TARGET_AUROC)
        tr = seconds_to(resnet["fold0_history"], "val_auroc", TARGET_AUROC)
        out["pneumonia_oof_auroc"] = ci(hybrid["metrics"]["classification"]["auroc"])
        out["pneumonia_auroc_per_fold"] = hybrid["metrics"]["classification"]["auroc_per_fold"]
        out["resnet18_oof_auroc"] = ci(resnet["metrics"]["classification"]["auroc"])
        out["resnet18_auroc_per_fold"] = resnet["metrics"]["classification"]["auroc_per_fold"]
        out["pneumonia_minutes_to_097"] = round(th / 60, 3) if th is not None else None
        out["resnet18_minutes_to_097"] = round(tr / 60, 3) if tr is not None else None
        out["time_ratio_vs_resnet18"] = round(th / tr, 3) if th is not None and tr else None
        out["pneumonia_train_minutes"], out["resnet18_train_minutes"] = hybrid["train_minutes"], resnet["train_minutes"]
        calibration = hybrid["metrics"]["classification"].get("calibration") or {}
        out["pneumonia_oof_ece"] = (calibration.get("after") or {}).get("ece")
        out["pneumonia_budget"], out["resnet18_budget"] = hybrid["budget"], resnet["budget"]
        details["pneumonia_hybrid"], details["pneumonia_resnet18"] = hybrid, resnet
    if "adrenal" in args.only:
        adrenal = run("adrenal_3d.yaml", args.out, args.overrides, args.folds, args.fresh)
        out["adrenal_oof_auroc"] = ci(adrenal["metrics"]["classification"]["auroc"])
        out["adrenal_auroc_per_fold"] = adrenal["metrics"]["classification"]["auroc_per_fold"]
        out["adrenal_train_minutes"], out["adrenal_budget"] = adrenal["train_minutes"], adrenal["budget"]
        details["adrenal"] = adrenal
    if "hippocampus" in args.only:
        hippo = run("hippocampus_seg.yaml", args.out, args.overrides, args.folds, args.fresh)
        seg = hippo["metrics"]["segmentation"]
        out["hippocampus_oof_dice"] = ci(seg["mean"]["dice"])
        out["hippocampus_oof_dice_per_class"] = {k: ci(v["dice"]) for k, v in seg["per_class"].items()}
        out["hippocampus_oof_hd95_mm"] = ci(seg["mean"]["hd95"])
        out["hippocampus_train_minutes"], out["hippocampus_budget"] = hippo["train_minutes"], hippo["budget"]
        details["hippocampus"] = hippo
    args.out.mkdir(parents=True, exist_ok=True)
    results = args.out / "train_benchmark.json"
    previous = json.loads(results.read_text()) if results.is_file() else {"summary": {}, "details": {}}
    summary = {**previous.get("summary", {}), **out}  # a partial run (--only) keeps the other parts
    results.write_text(
        json.dumps({"summary": summary, "details": {**previous.get("details", {}), **details}}, indent=2)
    )
    for key, value in summary.items():
        print(f"{key:32s} {value}")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
