"""The hybrid against its peers on real data, with ``medhybrid compare`` (same data, budget and seeds).

On every shipped data set: the hybrid as shipped; ``before`` = the hybrid as it was before issue 16
(strides as given, so 1/16 tokens; no full-resolution decoder block; the pooled-CNN shortcut on);
ResNet-only = the same encoder and decoder with an equal-FLOP convolutional bottleneck in place of the
Transformer (``context: conv``); a Transformer-only model; the strongest MONAI peers.

1. PneumoniaMNIST (``pipelines/pneumonia_2d.yaml``), 1 seed x 8 epochs: + ``pooled`` (the hybrid with the
   pooled-CNN shortcut on: the explicit ablation of ``fuse_pooled``), MONAI ResNet-18, and MONAI's ViT
   with 4x4 patches (49 tokens), width 192, 4 blocks (about the hybrid's parameter count).
2. AdrenalMNIST3D (``pipelines/adrenal_3d.yaml``), 1 seed x 16 epochs: + MONAI ResNet-18 (3D).
3. MSD Hippocampus (``pipelines/hippocampus_seg.yaml``), 1 seed x ``HIPPOCAMPUS_EPOCHS`` epochs: + the
   hybrid with instance norm, and MONAI BasicUNet. UNETR and SwinUNETR are left out for time on 2 cores
   (SwinUNETR did not finish one epoch in 15 minutes; add them to ``--models`` on a GPU).

Each table is reported on a split no run selected on (the manifest's ``test`` split if it has one, else
``val`` with every run selecting on an inner fifth of ``train``); see docs/evaluation.md.

Each comparison is the command printed before it runs (copy it to reproduce one part); finished runs
are reused. The last line is one JSON object with each table's rows.

Usage: python benchmarks/compare.py [--only pneumonia adrenal hippocampus] [--out benchmarks/runs]
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
HIPPOCAMPUS_EPOCHS = 8

BEFORE = "before={min_token_grid: 0, decoder_full_res: 0, fuse_pooled: true}"
RESNET_ONLY = "resnet_only={context: conv}"
VIT_SMALL = "vit_tiny_2d={hidden_size: 192, mlp_dim: 768, num_layers: 4, num_heads: 4, patch_size: 4}"


def commands(out: Path) -> dict[str, list[str]]:
    return {
        "pneumonia": [
            "compare", "pipelines/pneumonia_2d.yaml",
            "--models",
            "hybrid_r18_2d,before=hybrid_r18_2d,pooled=hybrid_r18_2d,resnet_only=hybrid_r18_2d,monai_resnet18_2d,vit_tiny_2d",
            "--seeds", "1", "--model-args", BEFORE, "--model-args", "pooled={fuse_pooled: true}",
            "--model-args", RESNET_ONLY, "--model-args", VIT_SMALL,
            "--bootstrap", "1000", "--out", str(out / "compare_pneumonia"),
        ],
        "adrenal": [
            "compare", "pipelines/adrenal_3d.yaml",
            "--models", "hybrid_r18_3d,before=hybrid_r18_3d,resnet_only=hybrid_r18_3d,monai_resnet18_3d",
            "--seeds", "1", "--model-args", BEFORE, "--model-args", RESNET_ONLY,
            "--bootstrap", "1000", "--out", str(out / "compare_adrenal"),
        ],
        "hippocampus": [
            "compare", "pipelines/hippocampus_seg.yaml",
            "--models", "hybrid_r18_3d,before=hybrid_r18_3d,instance_norm=hybrid_r18_3d,resnet_only=hybrid_r18_3d,"
            "basicunet_3d",
            "--seeds", "1", "--epochs", str(HIPPOCAMPUS_EPOCHS), "--model-args", BEFORE,
            "--model-args", "instance_norm={norm: instance}", "--model-args", RESNET_ONLY,
            "--bootstrap", "1000", "--out", str(out / "compare_hippocampus"),
        ],
    }  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=["pneumonia", "adrenal", "hippocampus"])
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
