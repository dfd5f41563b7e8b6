"""The acquisition-shift suite: each shift does what docs/evaluation.md says, and the suite's drops are
clean minus shifted AUROC on the same studies, with the calibration split left clean."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score
from typer.testing import CliRunner

from medhybrid.cli import app
from medhybrid.config import load_pipeline
from medhybrid.data.synth import synthesize_cohort
from medhybrid.errors import ConfigError
from medhybrid.evaluate.runner import EvaluateOptions, evaluate
from medhybrid.evaluate.shift import SHIFT_FILE, SHIFTS, run_shift_suite, shift_array
from medhybrid.train import train
from tests.test_evaluate import pipeline


def _checker(shape: tuple[int, ...]) -> np.ndarray:
    idx = np.indices(shape).sum(0)
    return (100.0 * (idx % 2)).astype(np.float32)


def test_contrast_and_gamma_change_the_intensities_as_documented() -> None:
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 200, size=(16, 16, 1)).astype(np.float32)
    c = shift_array(x, "contrast")
    assert c.shape == x.shape and c.dtype == np.float32
    assert c.mean() == pytest.approx(x.mean(), rel=1e-5)
    assert c.std() == pytest.approx(0.6 * x.std(), rel=1e-4)
    g = shift_array(x, "gamma")
    assert g.min() == pytest.approx(x.min(), abs=1e-3) and g.max() == pytest.approx(x.max(), abs=1e-2)
    order = np.argsort(x.ravel())
    assert np.all(np.diff(g.ravel()[order]) >= -1e-4)  # monotone: the ranking of voxels is kept
    assert np.median(g) < np.median(x)  # gamma > 1 darkens the mid-tones


def test_blur_and_resolution_remove_fine_detail_but_not_coarse_structure() -> None:
    fine = _checker((32, 32, 1))
    for name in ("blur", "resolution"):
        assert shift_array(fine, name).std() < 0.3 * fine.std(), name
    ramp = np.broadcast_to(np.linspace(0, 100, 32, dtype=np.float32)[:, None, None], (32, 32, 1)).copy()
    interior = (slice(2, -2), slice(2, -2))
    for name in ("blur", "resolution"):
        assert np.abs(shift_array(ramp, name) - ramp)[interior].max() < 3.0, name
    # a thin axis (a 2D image stored as I x J x 1, or a 3-slice volume) is not blurred along
    thin = _checker((16, 16, 3))
    assert shift_array(thin, "resolution").shape == thin.shape
    vol = shift_array(_checker((8, 8, 8, 2)), "blur")  # channels last are kept
    assert vol.shape == (8, 8, 8, 2) and vol.std() < 30


def test_noise_is_seeded_per_study_and_sized_to_the_range() -> None:
    x = np.linspace(0, 1000, 64 * 64, dtype=np.float32).reshape(64, 64, 1)
    a = shift_array(x, "noise", key="study-a", seed=0)
    assert np.array_equal(a, shift_array(x, "noise", key="study-a", seed=0))
    assert not np.array_equal(a, shift_array(x, "noise", key="study-b", seed=0))
    spread = np.percentile(x, 99) - np.percentile(x, 1)
    assert (a - x).std() == pytest.approx(0.05 * spread, rel=0.05)
    with pytest.raises(ConfigError, match="unknown acquisition shift 'fog'"):
        shift_array(x, "fog")
    assert set(SHIFTS) == {"contrast", "gamma", "blur", "noise", "resolution"}


@pytest.fixture(scope="module")
def cls_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("shift")
    cohort = synthesize_cohort(tmp / "cohort", n=30, dims=2, fmt="nifti", seed=11)
    train(load_pipeline(pipeline(tmp, cohort, task="classification")), tmp / "run")
    return tmp / "run", cohort


def test_the_suite_reports_clean_minus_shifted_auroc_on_the_same_studies(
    cls_run: tuple[Path, Path], tmp_path: Path
) -> None:
    run, manifest = cls_run
    opts = EvaluateOptions(split="test", n_boot=200, saliency=False, store_calibration=False)
    suite = run_shift_suite(run, manifest, tmp_path / "shift", opts, shifts=("noise", "contrast"))
    assert json.loads((tmp_path / "shift" / SHIFT_FILE).read_text()) == json.loads(json.dumps(suite))
    clean = evaluate(run, manifest, tmp_path / "clean", opts)
    assert suite["clean"]["auroc"] == pytest.approx(clean.metrics["classification"]["auroc"]["value"])
    labels = {r.study_id: r.label for r in clean.records}
    for name in ("noise", "contrast"):
        res = evaluate(run, manifest, tmp_path / name, EvaluateOptions(**{**opts.__dict__, "shift": name}))
        ids = [r.study_id for r in res.records]
        y = [labels[i] for i in ids]
        shifted = roc_auc_score(y, [r.score for r in res.records])
        base = roc_auc_score(y, [next(c.score for c in clean.records if c.study_id == i) for i in ids])
        s = suite["shifts"][name]
        assert s["auroc"] == pytest.approx(shifted) and s["drop"] == pytest.approx(base - shifted)
        assert s["drop_ci_low"] <= s["drop"] <= s["drop_ci_high"]
        # the shift reached the model (a CT window does not undo it) ...
        assert any(abs(a.score - b.score) > 1e-6 for a, b in zip(clean.records, res.records, strict=True))
        # ... and only on the evaluated split: the calibration split was scored clean
        assert res.metrics["classification"]["temperature"] == pytest.approx(
            clean.metrics["classification"]["temperature"]
        )
    assert suite["max_drop"] == max(s["drop"] for s in suite["shifts"].values())


def test_evaluate_shift_suite_on_the_command_line(cls_run: tuple[Path, Path], tmp_path: Path) -> None:
    run, manifest = cls_run
    args = ["evaluate", "-m", str(run), "--manifest", str(manifest), "-o", str(tmp_path / "ev")]
    result = CliRunner().invoke(app, [*args, "--no-saliency", "--bootstrap", "100", "--shift-suite"])
    assert result.exit_code == 0, result.output
    for name in SHIFTS:
        assert f"shift {name}: AUROC" in result.output
    assert "largest AUROC drop under shift" in result.output
    assert (tmp_path / "ev" / "shift" / SHIFT_FILE).is_file()
