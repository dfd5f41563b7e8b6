"""K-fold cross-validation (``train --folds``): patient-grouped stratified folds, per-fold runs that select
on their own inner fold, the pooled out-of-fold report, the fold models as an ensemble in ``infer``, and
``compare`` reporting only on studies no run selected on."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from medhybrid.cli import app
from medhybrid.errors import ConfigError
from medhybrid.evaluate.compare import CompareOptions, compare
from medhybrid.infer.batch import run_inference
from medhybrid.infer.predictor import Predictor
from medhybrid.io.manifest import read_manifest
from medhybrid.io.manifest_validate import validate_manifest
from medhybrid.io.scan import load_study
from medhybrid.train.folds import assign_folds
from tests.easy_cohort import easy_pipeline, write_easy_cohort

K = 3


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_easy_cohort(tmp_path_factory.mktemp("folds"), n=36, seed=5, patients=True)


@pytest.fixture(scope="module")
def cv_run(cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("cvrun")
    pipe = tmp / "pipe.yaml"
    pipe.write_text(yaml.safe_dump(easy_pipeline(cohort, epochs=8)))
    result = CliRunner().invoke(app, ["train", str(pipe), "--folds", str(K), "--out", str(tmp / "run")])
    assert result.exit_code == 0, result.output
    assert "out-of-fold AUROC" in result.output and "out-of-fold Dice" in result.output
    return tmp / "run"


def test_folds_keep_patients_together_and_are_stratified_and_seeded(cohort: Path) -> None:
    rows = read_manifest(cohort).rows
    folds = assign_folds(rows, K, seed=3)
    assert sorted(folds) == sorted(r.study_id for r in rows)
    by_patient: dict[str, set[int]] = {}
    for r in rows:
        by_patient.setdefault(str(r.patient_id), set()).add(folds[r.study_id])
    assert all(len(f) == 1 for f in by_patient.values())
    abnormal = [sum(r.label == 1 for r in rows if folds[r.study_id] == k) for k in range(K)]
    assert max(abnormal) - min(abnormal) <= 1  # stratified: each patient has one abnormal study
    assert assign_folds(rows, K, seed=3) == folds and assign_folds(rows, K, seed=4) != folds
    with pytest.raises(ConfigError, match="patients"):
        assign_folds(rows[:4], 5, seed=0)


def test_a_patient_in_two_splits_is_a_validation_error(cohort: Path, tmp_path: Path) -> None:
    rows = list(csv.DictReader(cohort.open()))
    rows[0]["split"], rows[1]["split"] = "train", "val"  # patient p0's two studies
    out = tmp_path / "leak.csv"
    with open(out, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(
            {**r, "image": str(cohort.parent / r["image"]), "mask": str(cohort.parent / r["mask"])} for r in rows
        )
    report = validate_manifest(out)
    assert "leak_patient" in report.codes() and not report.ok
    assert all("p0" not in p.message for p in report.errors)  # the patient id itself is never printed


def test_every_fold_tests_on_its_own_fold_and_selects_on_the_next(cv_run: Path) -> None:
    plan = json.loads((cv_run / "folds.json").read_text())
    assert plan["folds"] == K and plan["grouping"] == "patient_id"
    assert "p0" not in json.dumps(plan)  # study ids only
    assignment = plan["assignment"]
    for k in range(K):
        manifest = read_manifest(cv_run / f"fold_{k}" / "manifest.csv")
        split_of = {r.study_id: r.split for r in manifest.rows}
        assert {s for s, f in assignment.items() if f == k} == {s for s, sp in split_of.items() if sp == "test"}
        assert {s for s, f in assignment.items() if f == (k + 1) % K} == {
            s for s, sp in split_of.items() if sp == "val"
        }
        ckpt_cfg = json.loads((cv_run / f"fold_{k}" / "run.json").read_text())
        assert ckpt_cfg["status"] == "completed" and (cv_run / f"fold_{k}" / "best.calibration.json").is_file()


def test_fold_manifests_carry_pseudonyms_not_patient_ids(cv_run: Path) -> None:
    for k in range(K):
        text = (cv_run / f"fold_{k}" / "manifest.csv").read_text()
        rows = read_manifest(cv_run / f"fold_{k}" / "manifest.csv").rows
        assert all(r.patient_id and r.patient_id.startswith("patient_") for r in rows)
        assert ",p0," not in text and ",p1," not in text


def test_evaluating_the_ensemble_applies_its_stored_calibration(cv_run: Path, cohort: Path, tmp_path: Path) -> None:
    """The default calibration split (val) trained every fold model: nothing is fitted on it; the ensemble's
    own calibration (fitted out-of-fold) is applied, and left as it was."""
    from medhybrid.evaluate.runner import EvaluateOptions, evaluate

    sidecar = json.loads((cv_run / "ensemble.calibration.json").read_text())
    m = evaluate(cv_run, cohort, tmp_path / "ev", EvaluateOptions(split="test", n_boot=100, saliency=False)).metrics
    c = m["classification"]
    assert "trained the model" in m["calibration_not_refitted"] and "stored with the model" in c["protocol"]
    assert c["temperature"] == sidecar["temperature"]
    assert c["at_operating_point"]["threshold"] == pytest.approx(sidecar["operating_point"]["threshold"])
    assert json.loads((cv_run / "ensemble.calibration.json").read_text()) == sidecar
    assert m["splits"]["training"] == ["train", "val"] and "warning" not in m["splits"]  # test: never seen


def test_the_pooled_out_of_fold_report(cv_run: Path, cohort: Path) -> None:
    m = json.loads((cv_run / "cv" / "metrics.json").read_text())
    pooled = [r for r in read_manifest(cohort).rows if r.split in ("train", "val")]
    assert m["split"] == "out-of-fold" and m["n_studies"] == len(pooled) and m["n_failed"] == 0
    c = m["classification"]
    assert c["auroc"]["ci_low"] <= c["auroc"]["value"] <= c["auroc"]["ci_high"]
    assert c["auroc"]["resampling"] == "patient-clustered"
    assert len(c["auroc_per_fold"]) == K and c["auroc"]["value"] > 0.9  # the easy cohort is learnt
    assert m["segmentation"]["mean"]["dice"]["value"] > 0.5
    rows = list(csv.DictReader((cv_run / "cv" / "predictions.csv").open()))
    assert sorted(r["study_id"] for r in rows) == sorted(r.study_id for r in pooled)
    assert {r["fold"] for r in rows} == {str(k) for k in range(K)}
    assert (cv_run / "cv" / "report.html").read_text().count("<img") >= 2


def test_infer_on_a_fold_run_ensembles_the_fold_models(cv_run: Path, cohort: Path, tmp_path: Path) -> None:
    predictor = Predictor(cv_run, device="cpu", saliency=())
    assert len(predictor.members) == K and predictor.path.name == "ensemble.json"
    assert predictor.operating_point["method"] == "youden"  # fitted on the pooled out-of-fold predictions
    study = load_study(read_manifest(cohort).split("test")[1].image)
    pred = predictor.predict(study)
    prepared = predictor.preprocess(study)
    with torch.no_grad():
        logits = torch.stack([m.model(prepared.x)["logits"][0] for m in predictor.members]).mean(0)
    assert np.allclose(pred.logits, logits.numpy(), atol=1e-5)  # the mean of the members' logits
    expected = torch.softmax(logits / predictor.temperature, 0).numpy()
    assert np.allclose(pred.class_probs, expected, atol=1e-5)
    out = run_inference(cohort.parent, cv_run, tmp_path / "out")
    report = json.loads(next((tmp_path / "out").glob("s*/report.json")).read_text())
    assert report["model"]["checkpoint"] == "ensemble.json" and report["model"]["weights_sha256"] == (
        predictor.weights_sha256
    )
    assert len(out.done) == len(read_manifest(cohort).rows)
    html = next((tmp_path / "out").glob("s*/report.html")).read_text()
    assert "Cross-validation (out-of-fold)" in html and "optimistic" in html


def test_resume_reuses_finished_folds(cv_run: Path, cohort: Path, tmp_path: Path) -> None:
    marker = cv_run / "fold_0" / "metrics.jsonl"
    before = marker.stat().st_mtime_ns
    pipe = tmp_path / "pipe.yaml"
    pipe.write_text(yaml.safe_dump(easy_pipeline(cohort, epochs=8)))
    again = CliRunner().invoke(app, ["train", str(pipe), "--folds", str(K), "--out", str(cv_run), "--resume"])
    assert again.exit_code == 0, again.output
    assert "reusing the finished run" in again.output and marker.stat().st_mtime_ns == before
    fresh = CliRunner().invoke(app, ["train", str(pipe), "--folds", str(K), "--out", str(cv_run)])
    assert fresh.exit_code == 1 and "already holds a cross-validation run" in fresh.output


def cohort_pipe(cohort: Path, tmp: Path, **kw: object) -> Path:
    path = tmp / "cohort_pipe.yaml"
    path.write_text(yaml.safe_dump(easy_pipeline(cohort, **kw)))  # type: ignore[arg-type]
    return path


def test_compare_folds_pairs_auroc_on_the_scores_its_table_uses(cohort: Path, tmp_path: Path) -> None:
    """Out-of-fold, the AUROC column pools each fold's calibrated probabilities (K models' raw scales
    differ); the paired difference must be computed on the same scores, or it can disagree in sign."""
    from sklearn.metrics import roc_auc_score

    pipe = cohort_pipe(cohort, tmp_path, epochs=1)
    opts = CompareOptions(
        models=["hybrid_tiny_2d", "small=hybrid_tiny_2d"],
        model_args={"small": {"context_depth": 0}},
        folds=3,
        n_boot=100,
        overrides=["data.task=classification", "eval.metrics=[auroc, loss]", "eval.select=auroc"],
    )
    result = compare(pipe, tmp_path / "cmp", opts)
    rows = {r["model"]: r for r in result["rows"]}
    pooled = {
        m: list(csv.DictReader((tmp_path / "cmp" / "runs" / f"{m}_seed0" / "cv" / "predictions.csv").open()))
        for m in rows
    }
    auc = {}
    for m, preds in pooled.items():
        preds.sort(key=lambda r: r["study_id"])
        auc[m] = roc_auc_score([int(r["label"]) for r in preds], [float(r["probability"]) for r in preds])
        assert rows[m]["auroc"]["value"] == pytest.approx(auc[m])
    delta = rows["small"]["delta_vs_first"]
    assert delta["metric"] == "auroc" and delta["value"] == pytest.approx(auc["small"] - auc["hybrid_tiny_2d"])


def test_compare_never_reports_on_the_split_it_selects_on(cohort: Path, tmp_path: Path) -> None:
    # no test split: val is held out and reported, the runs select on a fifth of train
    rows = list(csv.DictReader(cohort.open()))
    no_test = tmp_path / "no_test.csv"
    with open(no_test, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        for r in rows:
            r = {**r, "image": str(cohort.parent / r["image"]), "mask": str(cohort.parent / r["mask"])}
            w.writerow({**r, "split": "val" if r["split"] == "test" else r["split"]})
    no_test.with_suffix(".json").write_text(cohort.with_suffix(".json").read_text())
    pipe = tmp_path / "pipe.yaml"
    pipe.write_text(yaml.safe_dump(easy_pipeline(no_test, epochs=1)))
    opts = CompareOptions(models=["hybrid_tiny_2d", "small=hybrid_tiny_2d"], epochs=1, n_boot=100)
    opts.model_args = {"small": {"context_depth": 0}}
    result = compare(pipe, tmp_path / "cmp", opts)
    assert result["protocol"] == "held-out" and result["split"] == "test" and result["selection_split"] == "val"
    held = read_manifest(tmp_path / "cmp" / "holdout" / "manifest.csv")
    original_val = {r["study_id"] for r in rows if r["split"] in ("val", "test")}
    assert {r.study_id for r in held.split("test")} == original_val
    assert not {r.study_id for r in held.split("val")} & original_val
    with pytest.raises(ConfigError, match="select"):
        compare(pipe, tmp_path / "bad", CompareOptions(models=["hybrid_tiny_2d"], split="val"))
    # a test split that the pipeline selects on is not a reporting split
    from medhybrid.evaluate.protocols import choose_protocol

    swapped = CompareOptions(models=["hybrid_tiny_2d"], overrides=["data.val_split=test"])
    protocol = choose_protocol(cohort_pipe(cohort, tmp_path), swapped, tmp_path / "swap")
    assert protocol.name == "held-out" and protocol.calibration_split == "val"
    # --folds: pooled out-of-fold predictions, paired on the same studies
    folds = compare(pipe, tmp_path / "cv", CompareOptions(models=opts.models, model_args=opts.model_args, epochs=1,
                                                           folds=3, n_boot=100))  # fmt: skip
    assert folds["protocol"] == "out-of-fold"
    delta = folds["rows"][1]["delta_vs_first"]
    assert delta["metric"] == "dice" and delta["n_studies"] == len(held.rows)
