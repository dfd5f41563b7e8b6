"""It learns: a tiny hybrid trained for seconds on a trivially separable cohort detects and delineates its
lesions on a split nothing was selected on. A pipeline that trains without learning (a broken loss, a
mask misaligned with its image, labels shuffled by a loader) fails here, not in a benchmark."""

from __future__ import annotations

from pathlib import Path

import yaml

from medhybrid.config import load_pipeline
from medhybrid.data.synth import synthesize_cohort
from medhybrid.evaluate.runner import EvaluateOptions, evaluate
from medhybrid.train import train
from tests.easy_cohort import easy_pipeline, write_easy_cohort

REPO = Path(__file__).resolve().parents[1]


def test_a_tiny_hybrid_learns_the_easy_cohort(tmp_path: Path) -> None:
    manifest = write_easy_cohort(tmp_path / "cohort", n=48, seed=1)
    pipe = tmp_path / "pipe.yaml"
    pipe.write_text(yaml.safe_dump(easy_pipeline(manifest, epochs=6)))
    train(load_pipeline(pipe), tmp_path / "run")
    m = evaluate(
        tmp_path / "run", manifest, tmp_path / "eval", EvaluateOptions(split="test", n_boot=200, saliency=False)
    ).metrics
    assert m["n_failed"] == 0 and m["classification"]["n"] == 12 and "warning" not in m["splits"]
    assert m["classification"]["auroc"]["value"] > 0.9, m["classification"]["auroc"]
    assert m["segmentation"]["per_class"]["lesion"]["dice"]["value"] > 0.5, m["segmentation"]["per_class"]


def test_the_demo_recipe_learns_the_phantoms(tmp_path: Path) -> None:
    """The shipped demo pipeline, unchanged but for a shorter schedule (24 of 40 epochs) on the demo's 200
    phantoms, finds the lesions on the test split (about 160 s; measured 2026-12-07: AUROC 1.000, Dice
    0.639). The recipe before the full-resolution stem and the mask evidence in the classifier stayed at
    Dice 0 for 300 steps; the recipe at lr 0.003 collapsed to Dice 0 in a 16-epoch schedule (test AUROC
    0.34); at 20 epochs lr 0.001 is still before its breakthrough (0.80 / 0.24) (docs/benchmarks.md, demo)."""
    manifest = synthesize_cohort(tmp_path / "cohort", n=200, dims=3, fmt="nifti", seed=0)
    cfg = load_pipeline(REPO / "pipelines" / "demo.yaml", [f"data.manifest={manifest}", "train.stages.0.epochs=24"])
    train(cfg, tmp_path / "run")
    m = evaluate(
        tmp_path / "run", manifest, tmp_path / "eval", EvaluateOptions(split="test", n_boot=200, saliency=False)
    ).metrics
    assert m["n_failed"] == 0 and m["classification"]["n"] == 40
    assert m["classification"]["auroc"]["value"] > 0.9, m["classification"]["auroc"]
    assert m["segmentation"]["per_class"]["lesion"]["dice"]["value"] > 0.4, m["segmentation"]["per_class"]
