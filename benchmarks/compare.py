"""The hybrid against its peers on real data, with ``medhybrid compare`` (same data, budget and seeds).

1. PneumoniaMNIST (``pipelines/pneumonia_2d.yaml``), 2 seeds x 8 epochs:
   - ``hybrid_r18_2d`` with the pipeline's arguments (ResNet stages 1-3 at widths 32-128, 16 tokens into a
     2-block Transformer of width 192);
   - ResNet-only: ``resnet18_2d`` with exactly the hybrid's encoder (same stem, widths, strides, three
     stages), global pooling and a linear layer, i.e. the hybrid without its Transformer;
   - Transformer-only: MONAI's ViT with 4x4 patches (49 tokens), width 192, 4 blocks, about the hybrid's
     parameter count.
2. MSD Hippocampus (``pipelines/hippocampus_seg.yaml``), 1 seed x ``HIPPOCAMPUS_EPOCHS`` epochs: the
   hybrid; ResNet-only: the same network without Transformer blocks (``context_depth: 0``); MONAI UNETR
   (Transformer encoder); BasicUNet (a CNN U-Net). SwinUNETR is left out: even at feature size 12 it did
   not finish one epoch in 15 minutes on 2 cores (add ``swinunetr_3d`` to ``--models`` on a GPU).

Neither manifest has a test split, so ``compare`` reports on the held-out protocol: the ``val`` split is
reported and no run sees it; each run selects its epoch (and fits its temperature and threshold) on an
inner validation fifth of ``train`` (``OUT/holdout/manifest.csv``).

Each comparison is the command printed before it runs (copy it to reproduce one part); finished runs
are reused. The last line is one JSON object with each table's rows.

Usage: python benchmarks/compare.py [--only pneumonia hippocampus] [--out benchmarks/runs]
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HIPPOCAMPUS_EPOCHS = 3

RESNET_LIKE_HYBRID = (
    "resnet18_2d={widths: [32, 64, 128, 256], stem_channels: 32, stem_stride: 2, pool_stride: 1, "
    "stage_strides: [1, 2, 2, 2], num_stages: 3}"
)
VIT_SMALL = "vit_tiny_2d={hidden_size: 192, mlp_dim: 768, num_layers: 4, num_heads: 4, patch_size: 4}"


def commands(out: Path) -> dict[str, list[str]]:
    return {
        "pneumonia": [
            "compare", "pipelines/pneumonia_2d.yaml",
            "--models", "hybrid_r18_2d,resnet18_2d,vit_tiny_2d", "--seeds", "2", "--epochs", "8",
            "--model-args", RESNET_LIKE_HYBRID, "--model-args", VIT_SMALL,
            "--out", str(out / "compare_pneumonia"),
        ],
        "hippocampus": [
            "compare", "pipelines/hippocampus_seg.yaml",
            "--models", "hybrid_r18_3d,resnet_only=hybrid_r18_3d,unetr_3d,basicunet_3d",
            "--seeds", "1", "--epochs", str(HIPPOCAMPUS_EPOCHS), "--model-args", "resnet_only={context_depth: 0}",
            "--out", str(out / "compare_hippocampus"),
        ],
    }  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=["pneumonia", "hippocampus"])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/runs"))
    args = parser.parse_args()
    results = {}
    for name, argv in commands(args.out).items():
        if args.only and name not in args.only:
            continue
        print("medhybrid " + " ".join(shlex.quote(a) for a in argv), flush=True)
        t0 = time.perf_counter()
        code = subprocess.run([sys.executable, "-m", "medhybrid", *argv], cwd=REPO, check=False).returncode
        if code != 0:
            print(f"{name}: failed ({code})", file=sys.stderr)
            return 1
        table = json.loads((args.out / f"compare_{name}" / "compare.json").read_text())
        results[name] = {"minutes": round((time.perf_counter() - t0) / 60, 1), "rows": table["rows"]}
    print(json.dumps(results, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
