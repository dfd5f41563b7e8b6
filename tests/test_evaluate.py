"""Evaluation end to end: segmentation metrics by hand, deletion faithfulness, paired deltas, the
``evaluate`` command (calibration stored and used by infer, cross-fitting), and ``compare`` on a tiny
synthetic pipeline."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from sklearn.metrics import roc_auc_score
from typer.testing import CliRunner

from medhybrid.cli import app
from medhybrid.config import load_pipeline
from medhybrid.data.synth import synthesize_cohort
from medhybrid.errors import ConfigError, InputError
from medhybrid.evaluate.bootstrap import paired_auroc_delta, paired_mean_delta
from medhybrid.evaluate.compare import CompareOptions, compare, parse_model_args
from medhybrid.evaluate.faithfulness import area, deletion_inputs, deletion_scores
from medhybrid.evaluate.runner import EvaluateOptions, evaluate, parse_operating_point
from medhybrid.evaluate.segmentation import segmentation_scores
from medhybrid.infer.predictor import Predictor
from medhybrid.train import load_checkpoint, train

# --- segmentation metrics ---------------------------------------------------------------------------


def cube(shape: tuple[int, ...], lo: tuple[int, ...], hi: tuple[int, ...], value: int = 1) -> np.ndarray:
    a = np.zeros(shape, dtype=np.int16)
    a[tuple(slice(a0, a1) for a0, a1 in zip(lo, hi, strict=True))] = value
    return a


def test_dice_hd95_nsd_by_hand_and_spacing_aware() -> None:
    ref = cube((30, 30, 30), (10, 10, 10), (20, 20, 20))
    pred = cube((30, 30, 30), (12, 10, 10), (22, 20, 20))  # shifted 2 voxels along i
    iso = segmentation_scores(pred, ref, (1.0, 1.0, 1.0), 2)
    assert iso["dice"][0] == pytest.approx(2 * 800 / 2000)
    assert iso["hd95"][0] == pytest.approx(2.0)
    # along i the voxels are 3 mm: the same shift is 6 mm, and no boundary voxel of the shifted faces is
    # within a 1 mm tolerance any more, so NSD falls
    aniso = segmentation_scores(pred, ref, (3.0, 1.0, 1.0), 2)
    assert aniso["dice"][0] == pytest.approx(iso["dice"][0])
    assert aniso["hd95"][0] == pytest.approx(6.0)
    assert aniso["nsd"][0] < iso["nsd"][0] <= 1.0
    same = segmentation_scores(ref, ref, (1.0, 1.0, 1.0), 2)
    assert same == {"dice": [1.0], "hd95": [0.0], "nsd": [1.0]}


def test_empty_mask_rule() -> None:
    ref = cube((20, 20, 20), (5, 5, 5), (10, 10, 10))  # class 1 only
    pred = ref.copy()
    pred[15:18, 15:18, 15:18] = 2  # class 2 hallucinated
    s = segmentation_scores(pred, ref, (1.0, 2.0, 1.0), 4)  # class 3: empty on both sides
    diagonal = math.sqrt(20**2 + 40**2 + 20**2)
    assert s["dice"][:2] == [1.0, 0.0]
    assert s["hd95"][1] == pytest.approx(diagonal) and s["nsd"][1] == 0.0
    assert all(math.isnan(s[m][2]) for m in ("dice", "hd95", "nsd"))
    missed = segmentation_scores(np.zeros_like(ref), ref, (1.0, 1.0, 1.0), 2)
    assert missed["dice"] == [0.0] and missed["hd95"][0] > 30


def test_2d_masks_use_contours() -> None:
    ref = cube((20, 20, 1), (5, 5, 0), (15, 15, 1))
    pred = cube((20, 20, 1), (5, 6, 0), (15, 16, 1))
    s = segmentation_scores(pred, ref, (0.5, 0.5, 1.0), 2)
    assert s["hd95"][0] == pytest.approx(0.5)
    assert s["dice"][0] == pytest.approx(0.9)


# --- faithfulness ---------------------------------------------------------------------------------


def region_model(region: torch.Tensor):  # type: ignore[no-untyped-def]
    """Probability of abnormality = sigmoid of the mean brightness inside ``region``."""

    def score(batch: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(10 * (batch[:, 0][:, region].mean(-1) - 0.5))

    return score


def test_deletion_rewards_a_map_on_the_evidence() -> None:
    x = torch.zeros(1, 1, 16, 16)
    region = torch.zeros(16, 16, dtype=torch.bool)
    region[4:8, 4:8] = True
    x[0, 0][region] = 1.0
    score = region_model(region)
    good = region.float()[None]
    bad = 1.0 - good
    out = deletion_scores(score, x, {"good": good, "bad": bad}, steps=10, random_orders=3)
    assert out["good"]["curve"][0] == pytest.approx(1.0, abs=0.05)
    assert out["good"]["faithfulness"] > 0.3  # the evidence goes first: the score collapses at once
    assert out["bad"]["faithfulness"] < 0  # the evidence goes last
    assert out["good"]["auc"] < out["random"]["auc"] < out["bad"]["auc"]


def test_deletion_inputs_and_area() -> None:
    x = torch.arange(8.0).reshape(1, 1, 2, 4)
    order = torch.tensor([7, 6, 5, 4, 3, 2, 1, 0])
    inp = deletion_inputs(x, order, np.array([0.0, 0.25, 1.0]))
    assert torch.equal(inp[0], x[0])
    assert inp[1].flatten().tolist() == [0, 1, 2, 3, 4, 5, 3.5, 3.5]
    assert torch.all(inp[2] == 3.5)
    assert area(np.array([1.0, 1.0]), np.array([0.0, 1.0])) == 1.0


# --- paired differences ---------------------------------------------------------------------------


def test_paired_auroc_delta_matches_sklearn_and_is_zero_for_identical() -> None:
    rng = np.random.default_rng(1)
    y = rng.random(200) < 0.3
    a = y + rng.normal(0, 1.0, 200)
    b = y + rng.normal(0, 1.5, 200)
    d = paired_auroc_delta(y, a, b, n_boot=400, seed=3)
    assert d["value"] == pytest.approx(roc_auc_score(y, a) - roc_auc_score(y, b))
    assert d["ci_low"] < d["value"] < d["ci_high"]
    same = paired_auroc_delta(y, np.stack([a, b]), np.stack([a, b]), n_boot=100)
    assert same["value"] == 0 and same["ci_low"] == 0 and same["ci_high"] == 0
    assert paired_auroc_delta(y, a, b, n_boot=400, seed=3) == d  # seeded


def test_paired_mean_delta_skips_nan_pairs() -> None:
    d = paired_mean_delta(np.array([[0.9, 0.8, np.nan, 0.7]]), np.array([[0.8, 0.8, 0.5, 0.6]]), n_boot=200)
    assert d["n"] == 3 and d["value"] == pytest.approx(0.2 / 3)


def test_operating_point_and_model_args_parsing() -> None:
    assert parse_operating_point(None, "youden") == "youden"
    assert parse_operating_point("sensitivity=0.9", "youden").min_sensitivity == 0.9
    assert parse_operating_point("0.3", "youden") == 0.3
    with pytest.raises(InputError):
        parse_operating_point("often", "youden")
    assert parse_model_args(["vit_tiny_2d={patch_size: 4}"]) == {"vit_tiny_2d": {"patch_size": 4}}
    with pytest.raises(ConfigError):
        parse_model_args(["vit_tiny_2d=4"])


# --- evaluate and compare end to end ----------------------------------------------------------------


def pipeline(tmp: Path, manifest: Path, task: str = "multitask", **changes: Any) -> Path:
    raw: dict[str, Any] = {
        "name": "tiny_eval",
        "data": {
            "manifest": str(manifest),
            "task": task,
            "spatial_dims": 2,
            "intensity": "ct_soft_tissue",
            "spacing": [2.0, 2.0],
            "spatial_size": [64, 64],
        },
        "model": {"name": "hybrid_tiny_2d"},
        "train": {"batch_size": 4, "stages": [{"epochs": 3, "lr": 0.003}]},
        "eval": {
            "metrics": ["auroc", "dice", "loss"] if task == "multitask" else ["auroc", "loss"],
            "select": "auroc",
        },
        "runtime": {"seed": 5, "threads": 1},
    }
    raw.update(changes)
    path = tmp / f"{task}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synthesize_cohort(tmp_path_factory.mktemp("ev"), n=30, dims=2, fmt="nifti", seed=11)


@pytest.fixture(scope="module")
def run_dir(cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("evrun")
    cfg = load_pipeline(pipeline(tmp, cohort))
    train(cfg, tmp / "run")
    return tmp / "run"


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_evaluate_writes_everything_and_infer_uses_the_temperature(cohort: Path, run_dir: Path, tmp_path: Path) -> None:
    from medhybrid.infer.predictor import Prepared

    out = tmp_path / "eval"
    checkpoint_bytes = (run_dir / "best.pt").read_bytes()
    before = Predictor(run_dir, device="cpu").weights_sha256
    result = CliRunner().invoke(
        app,
        [
            "evaluate", "--model", str(run_dir), "--manifest", str(cohort), "--split", "test",
            "--out", str(out), "--bootstrap", "300", "--seed", "4",
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "AUROC" in result.output and "Dice" in result.output
    m = json.loads((out / "metrics.json").read_text())
    rows = read_csv(out / "predictions.csv")
    test_ids = [r["study_id"] for r in read_csv(cohort) if r["split"] == "test"]
    assert [r["study_id"] for r in rows] == test_ids and all(r["status"] == "ok" for r in rows)
    c = m["classification"]
    labels = np.array([int(r["label"]) for r in rows])
    assert set(labels) == {0, 1}  # the synthetic cohort's test split always has both classes
    raw = np.array([float(r["probability_raw"]) for r in rows])
    calibrated_p = np.array([float(r["probability"]) for r in rows])
    assert c["auroc"]["value"] == roc_auc_score(labels, raw)  # rank metrics: raw scores
    assert c["auroc"]["ci_low"] <= c["auroc"]["value"] <= c["auroc"]["ci_high"]
    assert c["protocol"].startswith("temperature and threshold fitted on the calibration split")
    assert m["splits"]["evaluated"] == "test" and m["splits"]["selection"] == ["val"] and "warning" not in m["splits"]
    op = c["at_operating_point"]
    called = calibrated_p >= op["threshold"]
    assert op["tp"] == int((called & (labels == 1)).sum()) and op["tn"] == int((~called & (labels == 0)).sum())
    assert [r["decision"] for r in rows] == ["abnormal" if v else "normal" for v in called]
    # segmentation: every foreground class has Dice/HD95/NSD per study and a mean with a CI
    seg = m["segmentation"]
    assert seg["per_class"] and all(set(v) == {"dice", "hd95", "nsd"} for v in seg["per_class"].values())
    assert any(k.startswith("hd95_") for k in rows[0])
    # saliency saved per study; faithfulness exactly when some study was called abnormal
    assert rows[0]["saliency_files"] and (out / rows[0]["saliency_files"].split(";")[0]).is_file()
    assert ("faithfulness" in m) == bool(called.any())
    html = (out / "report.html").read_text()
    assert html.count("<img") >= 3 and "ECE" in html
    # the calibration went into the sidecar: the checkpoint and the weights' hash are unchanged
    assert (run_dir / "best.pt").read_bytes() == checkpoint_bytes
    sidecar = json.loads((run_dir / "best.calibration.json").read_text())
    assert m["calibration_stored_in"] == str(run_dir / "best.calibration.json")
    temperature = sidecar["temperature"]
    assert temperature == pytest.approx(c["temperature"]) and temperature > 0
    calibrated = Predictor(run_dir, device="cpu")
    plain = Predictor(run_dir, device="cpu", temperature=1.0)
    assert calibrated.weights_sha256 == before == sidecar["weights_digest"]
    assert calibrated.temperature == pytest.approx(temperature)
    assert calibrated.operating_point["threshold"] == pytest.approx(sidecar["operating_point"]["threshold"])
    # at T = 1 a threshold fitted on raw scores applies: the sidecar's when its temperature is 1 (a fitted
    # temperature that worsened ECE is not applied), else training's
    raw_op = (
        sidecar["operating_point"] if temperature == 1.0 else load_checkpoint(run_dir / "best.pt")["operating_point"]
    )
    assert plain.operating_point == raw_op
    prepared = Prepared(torch.randn(1, 1, 64, 64), np.eye(3), np.eye(3), 0.0)
    a, b = calibrated.run(prepared, explain=False), plain.run(prepared, explain=False)
    assert a.logits is not None and np.array_equal(a.logits, b.logits)  # the temperature divides these logits
    expected = torch.softmax(torch.as_tensor(a.logits) / temperature, 0).numpy()
    assert np.allclose(a.class_probs, expected, atol=1e-6)


def test_evaluate_on_the_calibration_split_is_cross_fitted(cohort: Path, run_dir: Path, tmp_path: Path) -> None:
    opts = EvaluateOptions(split="val", calibration_split="val", n_boot=100, saliency=False, store_calibration=False)
    before = (run_dir / "best.pt").read_bytes()
    m = evaluate(run_dir, cohort, tmp_path / "cv", opts).metrics
    assert m["classification"]["protocol"].startswith("cross-fitted")
    assert len(m["classification"]["folds"]) == 2
    assert (run_dir / "best.pt").read_bytes() == before  # --no-store-calibration leaves the model alone


def test_a_bad_study_is_recorded_and_the_rest_evaluated(cohort: Path, run_dir: Path, tmp_path: Path) -> None:
    rows = read_csv(cohort)
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"not a nifti")
    bad = dict(rows[0], study_id="broken", image=str(broken), mask="", split="test")
    manifest = tmp_path / "manifest.csv"
    with open(manifest, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        for r in rows:
            w.writerow({**r, "image": str(cohort.parent / r["image"]), "mask": str(cohort.parent / r["mask"])})
        w.writerow(bad)
    opts = EvaluateOptions(split="test", n_boot=100, saliency=False, store_calibration=False)
    res = evaluate(run_dir, manifest, tmp_path / "out", opts)
    assert [r.study_id for r in res.failed] == ["broken"]
    assert res.metrics["n_failed"] == 1 and res.metrics["classification"]["n"] == res.metrics["n_studies"] - 1
    with pytest.raises(InputError, match="split 'holdout' has no studies"):
        evaluate(run_dir, manifest, tmp_path / "none", EvaluateOptions(split="holdout"))


def test_compare_runs_end_to_end(cohort: Path, tmp_path: Path) -> None:
    pipe = pipeline(tmp_path, cohort, task="classification")
    raw = yaml.safe_load(pipe.read_text())
    raw["model"]["args"] = {"norm": "group"}  # the pipeline's own arguments: the ablation keeps them
    pipe.write_text(yaml.safe_dump(raw))
    opts = CompareOptions(
        models=["hybrid_tiny_2d", "resnet_tiny_2d", "vit_tiny_2d", "resnet_only=hybrid_tiny_2d"],
        seeds=2,
        epochs=1,
        model_args={"vit_tiny_2d": {"patch_size": 16}, "resnet_only": {"context": "conv"}},
        n_boot=100,
    )
    result = compare(pipe, tmp_path / "cmp", opts)
    rows = {r["model"]: r for r in result["rows"]}
    assert list(rows) == ["hybrid_tiny_2d", "resnet_tiny_2d", "vit_tiny_2d", "resnet_only"]
    for r in rows.values():
        assert r["seeds"] == 2 and r["params"] > 0 and r["gflops"] > 0 and r["latency_ms"] > 0
        assert r["train_seconds"] is not None and 0 <= r["auroc"]["value"] <= 1
    assert rows["hybrid_tiny_2d"]["delta_vs_first"] is None
    assert rows["vit_tiny_2d"]["delta_vs_first"]["metric"] == "auroc"
    runs = {(r["model"], r["seed"]) for r in result["runs"]}
    assert runs == {(m, s) for m in rows for s in (5, 6)}
    ablation = load_checkpoint(tmp_path / "cmp" / "runs" / "resnet_only_seed0" / "best.pt")
    assert ablation["model_name"] == "hybrid_tiny_2d"
    assert ablation["model_args"]["context"] == "conv" and ablation["model_args"]["norm"] == "group"
    # an equal-FLOP convolutional bottleneck in place of the Transformer
    assert 0.9 < rows["resnet_only"]["gflops"] / rows["hybrid_tiny_2d"]["gflops"] < 1.1
    vit = load_checkpoint(tmp_path / "cmp" / "runs" / "vit_tiny_2d_seed0" / "best.pt")
    assert vit["model_args"]["patch_size"] == 16
    table = (tmp_path / "cmp" / "compare.md").read_text()
    assert table.count("\n") == 2 + 4 and "`resnet_tiny_2d`" in table
    assert (tmp_path / "cmp" / "compare.png").read_bytes()[:4] == b"\x89PNG"
    # a second call reuses the finished runs instead of training again (evaluation is redone)
    history = tmp_path / "cmp" / "runs" / "vit_tiny_2d_seed0" / "metrics.jsonl"
    mtime = history.stat().st_mtime_ns
    again = compare(pipe, tmp_path / "cmp", opts)
    assert history.stat().st_mtime_ns == mtime
    assert [r["auroc"]["value"] for r in again["rows"]] == [r["auroc"]["value"] for r in result["rows"]]


def test_compare_rejects_a_model_that_does_not_fit_before_training(cohort: Path, tmp_path: Path) -> None:
    pipe = pipeline(tmp_path, cohort, task="classification")
    with pytest.raises(ConfigError, match="3D"):
        compare(pipe, tmp_path / "bad", CompareOptions(models=["hybrid_tiny_2d", "resnet_tiny_3d"]))
    assert not (tmp_path / "bad" / "runs").exists()


def test_saliency_and_tta_leave_the_model_untouched(run_dir: Path) -> None:
    """MONAI's GradCAM restores the mode of the module it wraps; the model must come out in eval mode with
    the same BatchNorm statistics, so that later passes (TTA, deletion curves) are not in training mode."""
    from medhybrid.infer.predictor import Prepared

    predictor = Predictor(run_dir, device="cpu", tta=True)
    state = {k: v.clone() for k, v in predictor.model.state_dict().items()}
    prepared = Prepared(torch.randn(1, 1, 64, 64), np.eye(3), np.eye(3), 0.0)
    first = predictor.run(prepared)
    second = predictor.run(prepared)
    assert not predictor.model.training
    assert all(torch.equal(state[k], v) for k, v in predictor.model.state_dict().items())
    assert first.probability == second.probability
    plain = predictor.run(prepared, explain=False)
    assert plain.probability == pytest.approx(first.probability, abs=1e-6)
