"""It learns: a tiny hybrid trained for seconds on a trivially separable cohort detects and delineates its
lesions on a split nothing was selected on. A pipeline that trains without learning (a broken loss, a
mask misaligned with its image, labels shuffled by a loader) fails here, not in a benchmark."""

from __future__ import annotations

from pathlib import Path

import yaml

from medhybrid.config import load_pipeline
from medhybrid.evaluate.runner import EvaluateOptions, evaluate
from medhybrid.train import train
from tests.easy_cohort import easy_pipeline, write_easy_cohort


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
