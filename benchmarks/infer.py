"""Inference throughput and memory: 50 and 200 synthetic studies, and one 512 x 512 x 300 CT.

What it does:
1. A model with the demo pipeline's architecture (``pipelines/demo.yaml``, trained for 1 + 1 epochs on 20
   phantoms: its weights do not matter for speed), unless ``--model`` gives one.
2. Synthetic cohorts of 50 and 200 studies (64 x 64 x 32 CT phantoms as DICOM series; study ``i`` is the
   same in both), each inferred by ``medhybrid infer`` in a fresh process: DICOM in, report.json/html,
   mask and two saliency NIfTI files, DICOM SEG and SR out.
3. A 512 x 512 x 300 CT series (0.7 x 0.7 x 1.25 mm, 300 DICOM files, a 30 mm lesion), inferred the same way:
   the whole field of view at the model's spacing, window by window (docs/inference.md), with saliency.

Measured in each worker process: wall time of ``run_inference`` (model loading, study discovery, every
study), the per-step time sums from the reports, and peak RSS (``ru_maxrss``, the whole process:
Python, torch, the model and the data).

- ``studies_per_s`` = 200 / wall time of the 200-study run;
- ``model_time_share`` = time in the model (forward, Grad-CAM backward, attention rollout) / wall time;
- ``peak_rss_mb_50`` / ``peak_rss_mb_200``: flat means per-study memory is released;
- ``ct_peak_rss_mb``, ``ct_seconds``, ``ct_step_s``: the large CT (targets <= 2500 MB and <= 30 s on 2
  cores), and its time per step (read, preprocess, model, outputs).

The last line printed is one JSON object with those keys and the details.
Usage: python benchmarks/infer.py [--model RUN_OR_CKPT] [--out DIR] [--n 200] [--small 50] [--no-ct | --ct-only]
[--tta]
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CT_SHAPE = (512, 512, 300)
CT_SPACING = (0.7, 0.7, 1.25)


def worker(input_path: str, model: str, out: str, tta: bool) -> None:
    """Run one inference in this (fresh) process and print its measurements as JSON."""
    from medhybrid.infer.batch import InferOptions, run_inference
    from medhybrid.runtime import configure_threads

    configure_threads()
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    result = run_inference(Path(input_path), Path(model), Path(out), InferOptions(tta=tta))
    wall = time.perf_counter() - t0
    print(
        json.dumps(
            {
                "studies": len(result.done),
                "failed": len(result.failed),
                "wall_s": round(wall, 3),
                "loop_s": round(result.seconds, 3),
                "step_totals_s": {k: round(v, 3) for k, v in result.timings.items()},
                "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            }
        )
    )


def run_worker(input_path: Path, model: Path, out: Path, tta: bool) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--worker", str(input_path), str(model), str(out)] + (["--tta"] if tta else [])
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if done.returncode != 0:
        raise SystemExit(f"worker failed:\n{done.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def quick_model(out: Path) -> Path:
    from medhybrid.config import load_pipeline
    from medhybrid.data.synth import synthesize_cohort
    from medhybrid.train import train

    run_dir = out / "model"
    if (run_dir / "best.pt").is_file():
        return run_dir
    manifest = synthesize_cohort(out / "train_cohort", n=20, dims=3, fmt="nifti", seed=5)
    cfg = load_pipeline(
        REPO / "pipelines" / "demo.yaml",
        [f"data.manifest={manifest}", "train.stages.0.epochs=2"],
    )
    shutil.rmtree(run_dir, ignore_errors=True)
    train(cfg, run_dir)
    return run_dir


def cohort(out: Path, n: int) -> Path:
    from medhybrid.data.synth import synthesize_cohort

    folder = out / f"cohort{n}"
    if not (folder / "manifest.csv").is_file():
        shutil.rmtree(folder, ignore_errors=True)
        synthesize_cohort(folder, n=n, dims=3, fmt="dicom", seed=11)
    return folder / "dicom"


def large_ct(out: Path) -> Path:
    """A 512 x 512 x 300 CT series: the phantom of synth study 1 upsampled, with a 30 mm lesion."""
    from medhybrid.data.synth import synth_study
    from medhybrid.io.dicom_write import derive_uid, write_dicom_series

    folder = out / "ct512"
    if len(list(folder.glob("*.dcm"))) == CT_SHAPE[2]:
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    small = synth_study(11, 1, 3).image
    idx = [np.arange(n) * s // n for n, s in zip(CT_SHAPE, small.shape, strict=True)]
    volume = small[np.ix_(*idx)].astype(np.int16)
    centre = np.array(CT_SHAPE) // 2 + np.array([40, 30, 0])
    radius_vox = 15.0 / np.array(CT_SPACING)
    box = tuple(slice(int(c - r) - 1, int(c + r) + 2) for c, r in zip(centre, radius_vox, strict=True))
    grid = np.ogrid[box]
    sphere = sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radius_vox, strict=True)) <= 1.0
    volume[box][sphere] += 60
    affine = np.diag([-CT_SPACING[0], -CT_SPACING[1], CT_SPACING[2], 1.0])
    write_dicom_series(
        volume,
        affine,
        folder,
        study_uid=derive_uid("medhybrid-bench", "ct512", "study"),
        series_uid=derive_uid("medhybrid-bench", "ct512", "series"),
        series_description="BENCH CT 512x512x300",
        patient_name="BENCH^CT",
        patient_id="BENCH0001",
    )
    return folder


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", nargs=3, metavar=("INPUT", "MODEL", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument(
        "--model", type=Path, help="run folder or checkpoint (default: a quick demo-architecture model)"
    )
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "runs" / "infer")
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--small", type=int, default=50)
    parser.add_argument("--no-ct", action="store_true")
    parser.add_argument("--ct-only", action="store_true", help="only the large CT")
    parser.add_argument("--tta", action="store_true")
    args = parser.parse_args()
    if args.worker:
        worker(*args.worker, tta=args.tta)
        return 0
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    model = args.model or quick_model(out)
    print(f"model: {model}", flush=True)
    details: dict[str, Any] = {"model": str(model), "tta": args.tta}
    for n in () if args.ct_only else (args.small, args.n):
        folder = cohort(out, n)
        print(f"inferring {n} studies ...", flush=True)
        details[f"run_{n}"] = run_worker(folder, model, out / f"reports{n}", args.tta)
        print(f"  {details[f'run_{n}']}", flush=True)
    summary: dict[str, Any] = {"ct_peak_rss_mb": None}
    if not args.ct_only:
        big = details[f"run_{args.n}"]
        summary = {
            "studies_per_s": round(big["studies"] / big["wall_s"], 3),
            "model_time_share": round(big["step_totals_s"]["model"] / big["wall_s"], 3),
            "peak_rss_mb_50": details[f"run_{args.small}"]["peak_rss_mb"],
            "peak_rss_mb_200": big["peak_rss_mb"],
            "ct_peak_rss_mb": None,
        }
    if not args.no_ct:
        print("writing and inferring the 512x512x300 CT ...", flush=True)
        ct = large_ct(out)
        details["ct"] = run_worker(ct, model, out / "reports_ct", args.tta)
        print(f"  {details['ct']}", flush=True)
        summary["ct_peak_rss_mb"] = details["ct"]["peak_rss_mb"]
        summary["ct_seconds"] = details["ct"]["wall_s"]
        summary["ct_step_s"] = details["ct"]["step_totals_s"]
    (out / "infer_benchmark.json").write_text(json.dumps({"summary": summary, "details": details}, indent=2))
    print(json.dumps({**summary, "details": details}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
