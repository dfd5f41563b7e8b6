"""Shared fixtures: where ../shared/data is, and skipping cleanly without it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

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
