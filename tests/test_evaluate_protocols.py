"""Which numbers ``evaluate`` computes on what: rank metrics on raw scores (cross-fitting included), the
reference mask placed by its own geometry, segmentation-only models by the kind of their labels, and
CIs clustered by patient."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import yaml
from sklearn.metrics import roc_auc_score

from medhybrid.config import load_pipeline
from medhybrid.evaluate.classification import Fitted, Scored, classification_metrics, crossfit, halves
from medhybrid.evaluate.runner import EvaluateOptions, evaluate
from medhybrid.io.writers import nifti_bytes
from medhybrid.train import train
from medhybrid.train.evaluate import abnormality
from tests.easy_cohort import easy_pipeline, write_easy_cohort


def test_cross_fitted_auroc_is_the_raw_auroc_even_when_the_halves_reorder_studies() -> None:
    """Two halves calibrated with very different temperatures reorder studies across halves: the AUROC of
    those probabilities is not the model's AUROC. Rank metrics must use the raw scores."""
    rng = np.random.default_rng(3)
    n = 200  # halves of 100: enough that each half's fitted temperature also lowers its ECE (kept, not rejected)
    labels = np.arange(n) % 2
    s = Scored(labels, np.zeros(n), np.zeros((n, 2)))
    half = halves(s, seed=0)
    margin = np.where(labels == 1, 1.0, -1.0) + rng.normal(0, 1.2, n)
    # half 0: logits 8x too confident (its fit says T ~ 8); half 1: calibrated (T ~ 1)
    margin = np.where(half == 0, 8.0 * margin, margin)
    logits = np.stack([np.zeros(n), margin], axis=1)
    raw = abnormality(np.exp(logits) / np.exp(logits).sum(1, keepdims=True))
    s = Scored(labels, raw, logits)
    stored = Fitted(1.0, {"threshold": 0.5, "method": "fixed"})
    out, fitted, calibrated, _ = classification_metrics(
        s, s, "youden", stored, same_split=True, n_boot=200, seed=0, label_names={}, score_method="classifier"
    )
    assert out["protocol"].startswith("cross-fitted") and fitted is not None
    assert out["auroc"]["value"] == roc_auc_score(labels, raw)
    _, crossfit_scores, _, folds = crossfit(s, "youden", seed=0, fallback=stored)
    assert folds[0]["temperature"] < folds[1]["temperature"] / 3  # the halves really differ
    assert not any("temperature_rejected" in f for f in folds)
    assert roc_auc_score(labels, crossfit_scores) != roc_auc_score(labels, raw)  # what the old code reported
    assert np.array_equal(calibrated, crossfit_scores)  # the threshold is still applied to calibrated scores


# --- small trained models on the easy cohort (tests/easy_cohort.py) ------------------------------------


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_easy_cohort(tmp_path_factory.mktemp("proto"), n=40, seed=21)


@pytest.fixture(scope="module")
def runs(cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("proto_runs")
    out = {}
    for name, raw in (
        ("multitask", easy_pipeline(cohort, epochs=5)),
        ("lesion", easy_pipeline(cohort, task="segmentation", epochs=5, mask_kind="lesion")),
        ("anatomy", easy_pipeline(cohort, task="segmentation", epochs=1, mask_kind="anatomy")),
    ):
        path = tmp / f"{name}.yaml"
        path.write_text(yaml.safe_dump(raw))
        train(load_pipeline(path), tmp / name)
        out[name] = tmp / name
    return out


def rows_of(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def rewrite(manifest: Path, tmp: Path, change: Any) -> Path:
    """A copy of ``manifest`` (absolute paths) with ``change(row)`` applied to every row."""
    rows = rows_of(manifest)
    for r in rows:
        r["image"], r["mask"] = str(manifest.parent / r["image"]), str(manifest.parent / r["mask"])
        change(r)
    out = tmp / "manifest.csv"
    with open(out, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    out.with_suffix(".json").write_text(manifest.with_suffix(".json").read_text())
    return out


def test_a_flipped_axis_mask_is_scored_where_it_lies(cohort: Path, runs: dict[str, Path], tmp_path: Path) -> None:
    """Same voxels in space, stored with axis i reversed (and the affine saying so): the same Dice. Comparing
    arrays by shape alone would score the mirror image."""
    flipped_dir = tmp_path / "flipped"
    flipped_dir.mkdir()

    def flip(r: dict[str, str]) -> None:
        img = nib.load(r["mask"])
        data = np.asarray(img.dataobj)[::-1]
        affine = img.affine.copy()
        affine[:3, 3] += affine[:3, 0] * (data.shape[0] - 1)
        affine[:3, 0] *= -1
        target = flipped_dir / Path(r["mask"]).name
        target.write_bytes(nifti_bytes(data, affine))
        r["mask"] = str(target)

    opts = EvaluateOptions(split="test", n_boot=100, saliency=False, store_calibration=False)
    plain = evaluate(runs["multitask"], cohort, tmp_path / "plain", opts)
    moved = evaluate(runs["multitask"], rewrite(cohort, tmp_path, flip), tmp_path / "moved", opts)
    a = {r.study_id: r.seg["dice"][0] for r in plain.records if r.seg}
    b = {r.study_id: r.seg["dice"][0] for r in moved.records if r.seg}
    lesions = [k for k, v in a.items() if not np.isnan(v)]
    assert len(a) == len(b) == 10 and np.mean([a[k] for k in lesions]) > 0.7  # a model whose masks are real
    assert all(a[k] == pytest.approx(b[k], abs=1e-9) for k in lesions)  # scored where they lie, identically
    assert moved.metrics["segmentation"]["n_other_grid"] == len(b)
    assert plain.metrics["segmentation"]["n_other_grid"] == 0


def test_a_mask_off_the_image_is_a_typed_failure_naming_both_grids(
    cohort: Path, runs: dict[str, Path], tmp_path: Path
) -> None:
    def shift(r: dict[str, str]) -> None:
        img = nib.load(r["mask"])
        affine = img.affine.copy()
        affine[:3, 3] += (500.0, 0, 0)  # half a metre away
        target = tmp_path / Path(r["mask"]).name
        target.write_bytes(nifti_bytes(np.asarray(img.dataobj), affine))
        r["mask"] = str(target)

    opts = EvaluateOptions(split="test", n_boot=100, saliency=False, store_calibration=False)
    res = evaluate(runs["multitask"], rewrite(cohort, tmp_path, shift), tmp_path / "out", opts)
    assert res.failed and all(r.error.startswith("geometry_mismatch") for r in res.failed)
    message = res.failed[0].error
    assert "mask:" in message and "image:" in message and "axes" in message


def test_segmentation_only_lesion_model_scores_studies_by_lesion(
    cohort: Path, runs: dict[str, Path], tmp_path: Path
) -> None:
    m = evaluate(
        runs["lesion"], cohort, tmp_path / "lesion", EvaluateOptions(split="test", n_boot=100, saliency=False)
    ).metrics
    c = m["classification"]
    assert c["score"].startswith("max over lesion components") and "calibration" not in c
    assert c["temperature"] == 1.0 and c["protocol"].startswith("temperature and threshold fitted")
    rows = rows_of(tmp_path / "lesion" / "predictions.csv")
    scores = np.array([float(r["probability_raw"]) for r in rows])
    labels = np.array([int(r["label"]) for r in rows])
    assert c["auroc"]["value"] == roc_auc_score(labels, scores)
    assert np.all((scores >= 0) & (scores <= 1))
    sidecar = json.loads((runs["lesion"] / "best.calibration.json").read_text())
    assert sidecar["temperature"] == 1.0 and "threshold" in sidecar["operating_point"]


def test_a_calibration_split_of_one_class_keeps_the_stored_threshold(
    cohort: Path, runs: dict[str, Path], tmp_path: Path
) -> None:
    """Every validation study abnormal (lesion data where every case has a lesion): no threshold can be
    fitted on it; the stored one is used and the protocol says why, instead of an IndexError."""

    def only_lesions(r: dict[str, str]) -> None:
        if r["split"] == "val" and r["label"] == "0":
            r["split"] = "unused"

    manifest = rewrite(cohort, tmp_path, only_lesions)
    opts = EvaluateOptions(split="test", n_boot=100, saliency=False, store_calibration=True)
    before = json.loads((runs["lesion"] / "best.calibration.json").read_text())
    m = evaluate(runs["lesion"], manifest, tmp_path / "out", opts).metrics
    c = m["classification"]
    assert "not refitted" in c["protocol"] and "all abnormal" in c["operating_point"]["not_refitted"]
    assert c["operating_point"]["threshold"] == before["operating_point"]["threshold"]
    assert "calibration_stored_in" not in m  # nothing new was fitted, nothing overwritten
    assert json.loads((runs["lesion"] / "best.calibration.json").read_text()) == before


def test_a_png_mask_takes_the_pixel_size_of_its_radiograph() -> None:
    """A PNG has no pixel size of its own (1 mm by default); on a 0.5 mm radiograph of its size its
    distances (HD95, NSD, the empty-mask diagonal) are in the radiograph's millimetres."""
    from medhybrid.data.transforms import png_mask_on_image
    from medhybrid.io.study import Study

    image = Study("i", np.zeros((8, 6, 1), np.float32), np.diag([-0.5, -0.5, 1.0, 1.0]), "DX", Path("i"), "dicom")
    mask = Study("m", np.zeros((8, 6, 1), np.float32), np.diag([-1.0, -1.0, 1.0, 1.0]), "OT", Path("m.png"), "png")
    assert png_mask_on_image(mask, image).spacing == (0.5, 0.5, 1.0)
    nifti = Study("m", mask.array, mask.affine, "OT", Path("m.nii.gz"), "nifti")
    assert png_mask_on_image(nifti, image).spacing == (1.0, 1.0, 1.0)  # a NIfTI mask keeps its geometry


def test_anatomy_model_gives_no_verdict(cohort: Path, runs: dict[str, Path], tmp_path: Path) -> None:
    res = evaluate(runs["anatomy"], cohort, tmp_path / "anatomy", EvaluateOptions(split="test", n_boot=100))
    assert "classification" not in res.metrics and "segmentation" in res.metrics
    assert not (runs["anatomy"] / "best.calibration.json").exists()
    assert all(
        r["probability"] == "" and r["decision"] == "" for r in rows_of(tmp_path / "anatomy" / "predictions.csv")
    )


def test_patients_are_resampled_together(cohort: Path, runs: dict[str, Path], tmp_path: Path) -> None:
    """With patient_id, every CI resamples patients (their studies are not independent)."""

    def pair(r: dict[str, str]) -> None:
        r["patient_id"] = str(int(r["study_id"].split("_")[1]) // 4)  # 2 normal + 2 abnormal studies each

    manifest = rewrite(cohort, tmp_path, pair)
    rows = rows_of(manifest)
    for r in rows:  # keep each patient's two studies in one split (validate would refuse a leak)
        r["split"] = "test" if int(r["patient_id"]) % 3 == 0 else "val" if int(r["patient_id"]) % 3 == 1 else "train"
    with open(manifest, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    m = evaluate(
        runs["multitask"], manifest, tmp_path / "out", EvaluateOptions(split="test", n_boot=300, saliency=False)
    ).metrics
    assert m["bootstrap"]["resampling"] == "patients (manifest patient_id)"
    assert m["classification"]["auroc"]["resampling"] == "patient-clustered"
    assert m["classification"]["auroc"]["n_patients"] == len({r["patient_id"] for r in rows if r["split"] == "test"})
    assert m["segmentation"]["mean"]["dice"]["resampling"] == "patient-clustered"


def test_evaluating_the_selection_split_is_flagged(cohort: Path, runs: dict[str, Path], tmp_path: Path) -> None:
    opts = EvaluateOptions(split="val", n_boot=100, saliency=False, store_calibration=False)
    m = evaluate(runs["multitask"], cohort, tmp_path / "val", opts).metrics
    assert "selected the model's epoch" in m["splits"]["warning"]
    assert m["classification"]["protocol"].startswith("cross-fitted")


def _margin_logits(seed: int, n: int, scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 2
    margin = np.where(labels == 1, 1.0, -1.0) * rng.uniform(0.5, 3, n) + rng.normal(0, 1.5, n)
    return labels, np.stack([np.zeros(n), scale * margin], axis=1)


def test_a_temperature_that_worsens_ece_is_not_applied() -> None:
    """Temperature scaling minimises NLL; on a small calibration split that can raise the ECE (seed 2:
    T = 1.17 takes it from 0.231 to 0.268). Storing it would call a worse calibration "calibrated": fit keeps
    T = 1 and says why, and classification_metrics reports it."""
    from medhybrid.evaluate import metrics as M
    from medhybrid.evaluate.classification import fit

    labels, logits = _margin_logits(2, 20)
    nll_t = M.fit_temperature(logits, labels)
    ece = [M.calibration_bins(labels, M.softmax_t(logits, t))["ece"] for t in (1.0, nll_t)]
    assert nll_t != 1.0 and ece[1] > ece[0]  # the case really is one where NLL's temperature hurts ECE
    s = Scored(labels, abnormality(M.softmax_t(logits, 1.0)), logits)
    stored = Fitted(1.0, {"threshold": 0.5, "method": "fixed"})
    fitted = fit(s, "youden", stored)
    assert fitted.temperature == 1.0
    assert fitted.temperature_rejected is not None and f"{ece[1]:.3f}" in fitted.temperature_rejected
    out, _, _, _ = classification_metrics(
        s, s, "youden", stored, same_split=False, n_boot=50, seed=0, label_names={}, score_method="classifier"
    )
    assert out["temperature"] == 1.0 and "raised" in out["temperature_rejected"]
    # an overconfident model (logits x8): the fitted temperature lowers ECE and is kept
    labels, logits = _margin_logits(2, 200, scale=8.0)
    s = Scored(labels, abnormality(M.softmax_t(logits, 1.0)), logits)
    fitted = fit(s, "youden", stored)
    assert fitted.temperature > 2.0 and fitted.temperature_rejected is None
