"""Shared fixtures: where ../shared/data is, and skipping cleanly without it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path:
    """../shared/data beside the repository (override with MEDHYBRID_SHARED_DATA)."""
    return Path(os.environ.get("MEDHYBRID_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    root = shared_data_dir()
    if not (root / "README.md").is_file():
        pytest.skip(f"shared data not found at {root} (set MEDHYBRID_SHARED_DATA to run these tests)")
    return root


# --- a cohort and a briefly trained 3D multitask hybrid, shared by the inference test modules ----------------
INFER_STUDIES = 6


@pytest.fixture(scope="session")
def infer_cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic cohort of INFER_STUDIES studies, each as DICOM and as NIfTI (``dicom/``, ``nifti/``)."""
    from medhybrid.data.synth import synthesize_cohort

    manifest = synthesize_cohort(tmp_path_factory.mktemp("cohort"), n=INFER_STUDIES, dims=3, fmt="both", seed=1)
    return manifest.parent


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run folder: a tiny 3D CT multitask hybrid trained for one epoch on another synthetic cohort."""
    from medhybrid.config import load_pipeline
    from medhybrid.data.synth import synthesize_cohort
    from medhybrid.train import train

    tmp = tmp_path_factory.mktemp("train")
    manifest = synthesize_cohort(tmp / "cohort", n=10, dims=3, fmt="nifti", seed=2)
    raw = {
        "name": "tiny3d",
        "data": {
            "manifest": str(manifest),
            "task": "multitask",
            "spatial_dims": 3,
            "modality": "CT",
            "intensity": "ct_soft_tissue",
            "spacing": [1.5, 1.5, 2.5],
            "spatial_size": [32, 32, 32],  # the whole 48 x 48 x 80 mm phantom: every study in scope
        },
        "model": {"name": "hybrid_tiny_3d"},
        "train": {"batch_size": 2, "stages": [{"name": "all", "epochs": 1, "lr": 0.003}]},
        "eval": {"metrics": ["auroc", "dice", "loss"], "select": "auroc"},
        "runtime": {"seed": 0, "threads": 2},
    }
    (tmp / "p.yaml").write_text(yaml.safe_dump(raw))
    train(load_pipeline(tmp / "p.yaml"), tmp / "run")
    return tmp / "run"
